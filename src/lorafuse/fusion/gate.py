"""LoRA-Flow fusion gates: the tensor maths (Wang et al., "LoRA-Flow", ACL 2024, arXiv 2402.11455).

One gate per decoder layer ``l`` reads the residual stream ``x_l(t)`` *entering* the layer (before
its input norm) at every token ``t`` and gives the weights of the k LoRAs for that layer::

    w_l(t) = softmax(W_l x_l(t) / T) + b_l          W_l: (k, hidden), zero-initialised
                                                     b_l: (k,), learnable

The bias is added *after* the softmax (as in the paper's code), so the weights neither sum to 1
nor stay in [0, 1]. With ``W = 0`` the gate starts at ``1/k + b``; the default ``b = e_start − 1/k``
makes it start as "the LoRA at index ``start`` only" (for k = 2 with the task LoRA second:
``b = [−0.5, 0.5]``, the paper's initialisation). The same ``w_l(t)`` scales every adapted module
of layer ``l``: ``h = W0 x + Σ_i w_l,i(t) · s_i B_i A_i x``.

Ablations of the paper (section 5): ``granularity="module"`` (one gate per adapted module, each
reading its layer's input), ``"step"`` (one gate for all layers, reading the input of the first
layer) and ``bias_in_softmax=True`` (``w = softmax(W x / T + b)``).

This module imports no transformers: the gates are functions over tensors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Granularity = Literal["layer", "module", "step"]


def gate_weights(
    x: Tensor, weight: Tensor, bias: Tensor, *, temperature: float = 1.0, bias_in_softmax: bool = False
) -> Tensor:
    """Weights for hidden states ``x (..., hidden)`` of one gate ``weight (k, hidden)``, ``bias (k,)``.

    ``softmax(x Wᵀ / T) + b`` (LoRA-Flow), or ``softmax(x Wᵀ / T + b)`` with ``bias_in_softmax``.
    Returns ``(..., k)``. The softmax runs in fp32 whatever the dtype of ``x``.
    """
    logits = x.float() @ weight.float().T / temperature  # (..., k)
    if bias_in_softmax:
        return torch.softmax(logits + bias.float(), dim=-1)  # (..., k)
    return torch.softmax(logits, dim=-1) + bias.float()  # (..., k)


def initial_bias(k: int, start: int | None, bias_in_softmax: bool) -> Tensor:
    """Bias that makes a zero-weight gate give "LoRA ``start`` only" (uniform when ``start`` is None).

    Bias after the softmax: ``b = e_start − 1/k`` gives exactly ``w = e_start``. Inside the softmax
    a one-hot start is out of reach; ``b = 4 · e_start`` gives ``w_start ≈ 0.98`` for k = 2.
    """
    bias = torch.zeros(k)
    if start is None:
        return bias
    if not 0 <= start < k:
        raise ValueError(f"gate start index {start} is outside 0..{k - 1}")
    if bias_in_softmax:
        bias[start] = 4.0
        return bias
    bias -= 1.0 / k
    bias[start] += 1.0
    return bias


@dataclass(frozen=True)
class GateConfig:
    """Shape and options of a set of LoRA-Flow gates (saved in a fusion's JSON)."""

    k: int
    hidden_size: int
    num_layers: int
    granularity: Granularity = "layer"
    temperature: float = 1.0
    bias_in_softmax: bool = False
    start: int | None = -1  # the LoRA the gate starts on (-1 = the last one, the task LoRA); None = uniform
    module_paths: tuple[str, ...] = ()  # one gate each when granularity == "module"

    def __post_init__(self) -> None:
        if self.k < 1 or self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError(f"gate needs k, hidden_size, num_layers ≥ 1, got {self}")
        if self.granularity not in ("layer", "module", "step"):
            raise ValueError(f"granularity must be layer, module or step, got {self.granularity!r}")
        if self.granularity == "module" and not self.module_paths:
            raise ValueError("granularity='module' needs the adapted module paths")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")

    @property
    def num_gates(self) -> int:
        """Layers (``layer``), adapted modules (``module``) or 1 (``step``)."""
        return {"layer": self.num_layers, "module": len(self.module_paths), "step": 1}[self.granularity]

    @property
    def num_params(self) -> int:
        """``gates × hidden × k + gates × k`` (for layer gates: layers × hidden × k + layers × k)."""
        return self.num_gates * (self.hidden_size * self.k + self.k)

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out["module_paths"] = list(self.module_paths)
        return out


class FlowGates(nn.Module):
    """The trainable parameters of all gates: ``weight (G, k, hidden)`` (zeros) and ``bias (G, k)``."""

    def __init__(self, config: GateConfig) -> None:
        super().__init__()
        self.config = config
        start = None if config.start is None else config.start % config.k
        self.weight = nn.Parameter(torch.zeros(config.num_gates, config.k, config.hidden_size))
        self.bias = nn.Parameter(
            initial_bias(config.k, start, config.bias_in_softmax).repeat(config.num_gates, 1)
        )

    def forward(self, x: Tensor, gate: int) -> Tensor:
        """Weights ``(..., k)`` of gate ``gate`` for hidden states ``x (..., hidden)``."""
        return gate_weights(
            x,
            self.weight[gate],
            self.bias[gate],
            temperature=self.config.temperature,
            bias_in_softmax=self.config.bias_in_softmax,
        )
