"""Learned CAT weights (LoRA Soups, Prabhakar et al. 2024, arXiv 2410.13025) as a bank weight source.

One trainable scalar per LoRA per adapted module, softmax-normalised per module::

    h = W0 x + Σ_i softmax(c_m)_i · s_i B_i A_i x        c_m: (k,) for module m, zero-initialised

so every module starts at the uniform average. Task-level: the same weights for every token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lorafuse.fusion.weighting import Shapes, Weighting
from lorafuse.runtime import ForwardCall, LoRABank, Reads

if TYPE_CHECKING:
    from lorafuse.fusion.gate import GateConfig
    from lorafuse.runtime import AttachedBank


class CatWeights(nn.Module):
    """``logits (modules, k)``; ``weights_for`` gives ``softmax(logits[module]) (k,)``.

    Also a :class:`~lorafuse.runtime.WeightRule` reading nothing (``reads = "none"``), for serving
    rows that use learned CAT weights; a module without CAT weights gets 0.
    """

    reads: Reads = "none"
    per_module = True

    def __init__(self, module_paths: Sequence[str], k: int) -> None:
        super().__init__()
        self.module_paths = list(module_paths)
        self._index = {p: i for i, p in enumerate(self.module_paths)}
        self.logits = nn.Parameter(torch.zeros(len(self.module_paths), k))

    def weights_for(self, bank: LoRABank, x: Tensor) -> Tensor | None:
        return torch.softmax(self.logits[self._index[bank.path]], dim=-1).to(bank.A.dtype)  # (k,)

    def weights(self, hidden: Tensor, layer: int | None, path: str, call: ForwardCall) -> Tensor:
        """``softmax(c_m) (n, 1, k)`` for module ``m = path``, the same for every token."""
        index = self._index.get(path)
        if index is None:
            return self.logits.new_zeros(hidden.shape[0], 1, self.logits.shape[1])  # (n, 1, k)
        w = torch.softmax(self.logits[index].float(), dim=-1)  # (k,)
        return w.expand(hidden.shape[0], 1, -1)  # (n, 1, k)

    @torch.no_grad()
    def mean_weights(self) -> Tensor:
        """Mean over modules of the softmax weights ``(k,)`` (for reports)."""
        return torch.softmax(self.logits, dim=-1).mean(0)


class CatWeighting(Weighting):
    """The stored ``cat-weights`` kind: ``logits (modules, k)`` and the module order."""

    name = "cat-weights"
    paper = "Prabhakar et al. 2024, LoRA Soups, arXiv:2410.13025"
    summary = "one softmax-normalised weight per LoRA per module"

    def shapes(self, k: int, gate: GateConfig | None, module_paths: Sequence[str]) -> Shapes:
        return {"logits": (len(module_paths), k)}

    def check(self, k: int, gate: GateConfig | None, module_paths: Sequence[str]) -> str | None:
        if not module_paths or len(set(module_paths)) != len(module_paths):
            return "module_paths must list each adapted module once for a cat-weights fusion"
        return None

    def bank_problem(self, handle: AttachedBank, module_paths: Sequence[str]) -> str | None:
        missing = set(handle.banks) - set(module_paths)
        return f"no CAT weights for modules {sorted(missing)[:3]}" if missing else None

    def build_rule(
        self, tensors: Mapping[str, Tensor], gate: GateConfig | None, module_paths: Sequence[str]
    ) -> CatWeights:
        cat = CatWeights(module_paths, tensors["logits"].shape[1])
        with torch.no_grad():
            cat.logits.copy_(tensors["logits"])
        return cat
