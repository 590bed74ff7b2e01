"""The one bank module wrapped around each adapted linear layer, and the source protocol feeding it.

``LoRABank`` keeps the original layer untouched as ``base`` and holds a table of LoRA ranks as
non-persistent buffers, ``A (N, in)`` (scales folded in) and ``B (out, N)``. Each forward pass it
asks its :class:`CoefficientSource` for per-rank coefficients ``c (B|1, 1|T, R)`` and, when the
source names them, the table rows they multiply::

    y = base(x) + ((x A_Iᵀ) ⊙ c) B_Iᵀ         I = the rows used (all N, in order, when not named)

Two fillings of the same module (vLLM's split of the LoRA layer from the Punica metadata):

* :func:`~lorafuse.runtime.attach` stacks a fixed bank of k LoRAs (``N = Σ r_i``, ``owner`` says
  which LoRA each rank belongs to) and its sources give per-LoRA weights, spread over the ranks;
* :class:`~lorafuse.runtime.AdapterPool` keeps hundreds of adapters in one table and its batch plan
  names, per batch row, the rows it uses (Punica's gathered kernel) or the rows the whole batch
  shares (one matmul over them).

Per-LoRA weights come from a :class:`WeightSource` (static weights, learned CAT weights) or from a
:class:`~lorafuse.runtime.layer_input.LayerInputSource` (LoRA-Flow gates, routers, Arrow, the
instance encoder), which implement only their weight rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lorafuse._layers import layer_index
from lorafuse.runtime.functional import (
    bank_delta,
    check_weights,
    gathered_delta,
    rank_index,
    spread_weights,
    table_delta,
    token_rows,
)


@dataclass(frozen=True)
class Coefficients:
    """Per-rank coefficients of one forward pass and the table rows they multiply.

    ``rows is None``: the bank's whole table in order (an attached stack). ``rows (B, R)``: row b
    multiplies table rows ``rows[b]`` (gathered kernel). ``used (U,)`` with ``position (B, R)``:
    the batch shares the U rows ``used``; ``position[b, j]`` is the column of ``rows[b, j]`` in it
    (table kernel). ``key`` names the row selection, so a bank gathers its factors once per plan.
    """

    coef: Tensor  # (B|1, 1|T, R)
    rows: Tensor | None = None  # (B, R) long
    used: Tensor | None = None  # (U,) long
    position: Tensor | None = None  # (B, R) long
    key: int | None = None


@runtime_checkable
class CoefficientSource(Protocol):
    """The one protocol a bank reads: per-rank coefficients for this forward, ``None`` = base only."""

    def coefficients(self, bank: LoRABank, x: Tensor) -> Coefficients | None: ...


@runtime_checkable
class WeightSource(Protocol):
    """Per-LoRA weights for an attached stack; the bank spreads them over each LoRA's ranks."""

    def weights_for(self, bank: LoRABank, x: Tensor) -> Tensor | None:
        """Weights of shape ``(k,)``, ``(batch, k)`` or ``(batch, seq, k)`` for input ``x``."""
        ...


class PerLoRAWeights:
    """A :class:`CoefficientSource` from a :class:`WeightSource`: ``c[·, ·, j] = w[·, ·, owner[j]]``."""

    def __init__(self, source: WeightSource) -> None:
        self.source = source

    def coefficients(self, bank: LoRABank, x: Tensor) -> Coefficients | None:
        weights = self.source.weights_for(bank, x)
        if weights is None:
            return None
        return Coefficients(spread_weights(weights.to(bank.A.dtype), bank.owner))  # (B|1, 1|T, R)


def as_coefficient_source(source: CoefficientSource | WeightSource) -> CoefficientSource:
    """``source`` itself when it gives coefficients, else its per-LoRA weights spread over ranks."""
    if hasattr(source, "coefficients"):
        return source  # type: ignore[return-value]
    if hasattr(source, "weights_for"):
        return PerLoRAWeights(source)  # type: ignore[arg-type]
    raise TypeError(f"{type(source).__name__} has neither coefficients() nor weights_for()")


class StaticWeights:
    """One weight tensor shared by every bank: ``(k,)``, ``(batch, k)`` or ``(batch, seq, k)``."""

    def __init__(self, weights: Tensor, k: int) -> None:
        self.k = k
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self.set(weights)

    def set(self, weights: Tensor) -> None:
        self.weights = check_weights(weights, self.k).detach()
        self._cache = {}
        self.all_zero = not bool(self.weights.any())

    def weights_for(self, bank: LoRABank, x: Tensor) -> Tensor | None:
        if self.all_zero:
            return None
        key = (bank.A.device, bank.A.dtype)
        if key not in self._cache:
            self._cache[key] = self.weights.to(device=bank.A.device, dtype=bank.A.dtype)
        return self._cache[key]

    def coefficients(self, bank: LoRABank, x: Tensor) -> Coefficients | None:
        weights = self.weights_for(bank, x)
        return None if weights is None else Coefficients(spread_weights(weights, bank.owner))


class LoRABank(nn.Module):
    """A linear layer plus a table of LoRA ranks: ``y = base(x) + ((x A_Iᵀ) ⊙ c) B_Iᵀ``.

    ``owner (N,)`` is the LoRA each rank of an attached stack belongs to (``ranks`` its sizes); a
    serving pool's table has no fixed owners (all -1): its plans say which rows each batch row uses.
    """

    def __init__(
        self,
        base: nn.Module,
        A: Tensor,
        B: Tensor,
        path: str,
        source: CoefficientSource | WeightSource,
        ranks: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("A", A, persistent=False)  # (N, in), scales folded in
        self.register_buffer("B", B, persistent=False)  # (out, N)
        owner = rank_index(ranks) if ranks is not None else torch.full((A.shape[0],), -1, dtype=torch.long)
        self.register_buffer("owner", owner.to(A.device), persistent=False)  # (N,)
        self.ranks = list(ranks) if ranks is not None else None
        self.path = path
        self.layer_index: int | None = layer_index(path)
        self._gathered: tuple[int, Tensor, Tensor] | None = None
        self.set_source(source)

    @property
    def rank_index(self) -> Tensor:
        """``(R,)`` the LoRA owning each rank of an attached stack (same as ``owner``)."""
        return self.owner

    @property
    def k(self) -> int:
        return len(self.ranks) if self.ranks is not None else 0

    @property
    def wrapped_linear(self) -> nn.Module:
        """The base layer (for :func:`lorafuse.adapters.validate.linear_shape`)."""
        return self.base

    def set_source(self, source: CoefficientSource | WeightSource) -> None:
        """Feed this bank from ``source``. A source that is an ``nn.Module`` (gates, routers) is not
        registered as a submodule: it stays out of the model's parameters and state dict."""
        object.__setattr__(self, "source", as_coefficient_source(source))

    def resize(self, rows: int) -> None:
        """Grow (or shrink) the table to ``rows`` rows, keeping the rows it has."""
        a = self.A.new_zeros(rows, self.A.shape[1])
        b = self.B.new_zeros(self.B.shape[0], rows)
        keep = min(rows, self.A.shape[0])
        a[:keep], b[:, :keep] = self.A[:keep], self.B[:, :keep]
        self.A, self.B = a, b
        self.owner = torch.full((rows,), -1, dtype=torch.long, device=a.device)
        self._gathered = None

    def write(self, rows: Tensor, A: Tensor | None, B: Tensor | None, scale: float) -> None:
        """Store ``s · A (r, in)`` and ``B (out, r)`` in the first r of ``rows`` (zeros elsewhere)."""
        rows = rows.to(self.A.device)
        self.A[rows] = 0
        self.B[:, rows] = 0
        if A is not None and B is not None:
            target = rows[: A.shape[0]]
            self.A[target] = (A.float() * scale).to(self.A)
            self.B[:, target] = B.float().to(self.B)
        self._gathered = None

    def extra_repr(self) -> str:
        what = f"ranks={self.ranks}" if self.ranks is not None else f"rows={self.A.shape[0]}"
        return f"path={self.path!r}, {what}, dtype={self.A.dtype}"

    def _factors(self, c: Coefficients) -> tuple[Tensor, Tensor]:
        """The factors of the rows ``c`` names, gathered once per row selection (``c.key``)."""
        if c.key is not None and self._gathered is not None and self._gathered[0] == c.key:
            return self._gathered[1], self._gathered[2]
        if c.used is not None:
            used = c.used.to(self.A.device)
            factors = (self.A[used], self.B.T[used])  # (U, in), (U, out)
        else:
            assert c.rows is not None
            rows = c.rows.to(self.A.device)
            factors = (self.A[rows], self.B.T[rows])  # (B, R, in), (B, R, out)
        if c.key is not None:
            self._gathered = (c.key, *factors)
        return factors

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        y = self.base(x, *args, **kwargs)
        if self.A.shape[0] == 0:
            return y
        c = self.source.coefficients(self, x)
        if c is None:
            return y
        coef = c.coef.to(device=x.device, dtype=self.A.dtype)  # (B|1, 1|T, R)
        rows = token_rows(x.to(self.A.dtype), coef.shape[0], coef.shape[1], self.path)  # (B, T, in)
        if c.rows is None and c.used is None:
            delta = bank_delta(rows, self.A, self.B, coef)  # (B, T, out)
        elif c.used is not None:
            assert c.position is not None
            A, B = self._factors(c)
            position = c.position.to(x.device).unsqueeze(1).expand(-1, coef.shape[1], -1)  # (B, 1|T, R)
            wide = coef.new_zeros(coef.shape[0], coef.shape[1], A.shape[0])  # (B, 1|T, U)
            wide.scatter_add_(2, position, coef)
            delta = table_delta(rows, A, B, wide)  # (B, T, out)
        else:
            A, B = self._factors(c)
            delta = gathered_delta(rows, A, B, coef)  # (B, T, out)
        return y + delta.reshape(y.shape).to(y.dtype)
