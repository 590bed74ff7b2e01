"""Learned CAT weights (LoRA Soups, Prabhakar et al. 2024, arXiv 2410.13025) as a bank weight source.

One trainable scalar per LoRA per adapted module, softmax-normalised per module::

    h = W0 x + Σ_i softmax(c_m)_i · s_i B_i A_i x        c_m: (k,) for module m, zero-initialised

so every module starts at the uniform average. Task-level: the same weights for every token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lorafuse.runtime import ForwardCall, LoRABank, Reads


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
