"""Arrow: training-free token routing over existing LoRAs (Ostapenko et al., 2024, arXiv 2405.11157).

Per adapted module, LoRA i's prototype ``v_i`` is the unit top right singular vector of its
``s_i B_i A_i`` (computed from the ``r × r`` core, :func:`top_right_singular_vector`). A token
with module input ``x`` scores ``|x · v_i|`` (the sign of a singular vector is arbitrary); the
top-k LoRAs get ``softmax(score / τ)`` over the selected, the others 0 (PEFT's Arrow defaults:
``top_k = 3``, ``τ = 1``). Routing is per module on that module's own input (``reads =
"module"``), so it needs no layer hook and follows ``generate`` with the KV cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lorafuse.route.functional import top_right_singular_vector
from lorafuse.runtime import AttachedBank, ForwardCall, LayerInputSource, Reads
from lorafuse.runtime.bank import LoRABank


def bank_prototypes(bank: LoRABank) -> Tensor:
    """``(k, in)`` unit prototypes of the bank's LoRAs (zeros for LoRAs absent from this module)."""
    protos = torch.zeros(bank.k, bank.A.shape[1], dtype=torch.float32)
    start = 0
    for i, r in enumerate(bank.ranks):
        if r:
            a, b = (
                bank.A[start : start + r].float(),
                bank.B[:, start : start + r].float(),
            )  # (r, in), (out, r)
            protos[i] = top_right_singular_vector(a, b)
        start += r
    return protos


def arrow_weights(x: Tensor, prototypes: Tensor, top_k: int, temperature: float = 1.0) -> Tensor:
    """``(..., in)``, ``(k, in)`` → ``(..., k)``: softmax of ``|x · v| / τ`` over the top-k, 0 elsewhere."""
    scores = (x.float() @ prototypes.T).abs()  # (..., k)
    top = scores.topk(top_k, dim=-1)
    return torch.zeros_like(scores).scatter(-1, top.indices, torch.softmax(top.values / temperature, dim=-1))


class ArrowSource(LayerInputSource):
    """Arrow's weight rule: every token of every module routed on that module's own input."""

    reads: Reads = "module"
    per_module = True

    def __init__(
        self, handle: AttachedBank, model: nn.Module, *, top_k: int = 3, temperature: float = 1.0
    ) -> None:
        if not 1 <= top_k <= handle.k:
            raise ValueError(
                f"Arrow top_k must be between 1 and the {handle.k} LoRAs of the bank, got {top_k}"
            )
        self.top_k, self.temperature = top_k, temperature
        self.prototypes = {path: bank_prototypes(bank) for path, bank in handle.banks.items()}
        self.stats: Callable[[int, Tensor, Tensor], None] | None = None
        super().__init__(model, self)

    def weights(self, hidden: Tensor, layer: int | None, path: str, call: ForwardCall) -> Tensor:
        """``softmax(|x · v_i| / τ)`` over the top-k prototypes of this module, 0 elsewhere."""
        protos = self.prototypes[path].to(hidden.device)
        weights = arrow_weights(hidden, protos, self.top_k, self.temperature)  # (B, T, k)
        if self.stats is not None and layer is not None:
            self.stats(layer, weights, call.token_mask(hidden))
        return weights
