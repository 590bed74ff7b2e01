"""A pool of many LoRAs on one base for serving: one flat rank table per layer, per-row plans.

:func:`~lorafuse.runtime.attach` stacks a fixed bank of k LoRAs and computes all of them for every
row. A server holds hundreds of adapters, loads and evicts them while it runs, and each batch row
wants its own adapter or weighted combination. The pool keeps, for each adapted linear layer, one
table of LoRA ranks shared by every loaded adapter (S-LoRA's unified pool), held by the layer's
:class:`~lorafuse.runtime.LoRABank` (the same module an attached stack uses)::

    A (N, in)     row j = s · A_i[r]  for the rank r of adapter i stored in row j
    B (out, N)    column j = B_i[:, r]
    row 0 is all zeros: the padding row

An adapter of rank r owns r rows (the same rows in every layer; layers where it has a smaller rank
or none keep zeros). A :class:`BatchPlan` says which rows each batch row uses and with which
coefficient; the layer then computes, per batch row ``b`` with rows ``I_b`` and coefficients
``c_b``::

    y_b = W0 x_b + ((x_b A[I_b]ᵀ) ⊙ c_b) B[:, I_b]ᵀ

A plain adapter is ``c = 1`` on its ranks; ``{"math": 0.7, "zh": 0.5}`` is 0.7 on math's ranks and
0.5 on zh's (exactly the ``cat`` merge); rows using a learned fusion get ``c`` per token from its
weight rule (:class:`~lorafuse.runtime.layer_input.LayerInputSource`, the same rules an attached
stack uses).
Two kernels, chosen per plan: *gathered* (Punica BGMV: each row multiplies only its own ranks, so
cost follows the ranks a row uses) and *table* (one matmul over the U rows the whole batch uses,
cheaper when few adapters are shared by many rows).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lorafuse.adapters.lora import LoRA
from lorafuse.adapters.validate import check_compatible, linear_shape
from lorafuse.errors import LorafuseError
from lorafuse.runtime.bank import Coefficients, LoRABank
from lorafuse.runtime.layer_input import LayerInputSource


@dataclass
class Allocation:
    """The table rows one loaded adapter owns (the same rows in every layer)."""

    key: str
    rows: Tensor  # (r,) long, rows of every table
    num_params: int
    refs: int = 0  # batch rows using it now; only unused adapters are evicted

    @property
    def rank(self) -> int:
        return int(self.rows.numel())


@dataclass
class BatchPlan:
    """Which table rows each batch row uses, with which coefficients.

    Built by :meth:`AdapterPool.plan` from one list of ``(allocation, weight)`` parts per row.
    ``owner[b, j]`` is the part (position in row b's list) owning rank position j, -1 for padding.
    """

    index: Tensor  # (B, R) long table rows, 0 = padding
    coef: Tensor  # (B, 1, R) static coefficients (0 on padding)
    owner: Tensor  # (B, R) long
    used: Tensor  # (U,) long, the distinct rows the batch uses
    position: Tensor  # (B, R) long, column of index[b, j] in ``used``
    kernel: str  # "gathered" or "table"
    version: int
    dynamic: LayerInputSource | None = None  # weight rules for some rows (learned fusions)

    @property
    def batch(self) -> int:
        return int(self.index.shape[0])

    @property
    def rank(self) -> int:
        return int(self.index.shape[1])

    def coefficients(self, bank: LoRABank, x: Tensor) -> Coefficients:
        """This plan's coefficients ``(B, 1|T, R)`` for ``bank`` and the table rows they multiply."""
        coef = self.coef if self.dynamic is None else self.dynamic.fill(bank, x, self.coef, self.owner)
        if self.kernel == "table":
            return Coefficients(coef, used=self.used, position=self.position, key=self.version)
        return Coefficients(coef, rows=self.index, key=self.version)


@dataclass
class PoolStats:
    loads: int = 0
    evictions: int = 0
    forwards: dict[str, int] = field(default_factory=lambda: {"gathered": 0, "table": 0})


class AdapterPool:
    """Many LoRAs on one model, loaded and evicted at run time; each batch row weights its own.

    ``pool.add(key, lora)`` stores a LoRA's ranks; ``pool.plan(rows)`` turns one list of
    ``(key, weight)`` per batch row into a :class:`BatchPlan`; ``with pool.use(plan): model(...)``
    runs a forward pass with it. Without a plan the model is the base model.

    ``table_max_ranks``: use the table kernel while the batch uses at most this many distinct rows
    (or no more than ``table_ratio`` × the widest row); otherwise gather per row.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        dtype: torch.dtype | None = None,
        initial_rows: int = 256,
        table_max_ranks: int = 64,
        table_ratio: float = 4.0,
    ) -> None:
        if any(isinstance(m, LoRABank) for m in model.modules()):
            raise LorafuseError("the model already has LoRA banks attached; detach them first")
        self.model = model
        self.dtype = dtype
        self.banks: dict[str, LoRABank] = {}
        self.adapters: OrderedDict[str, Allocation] = OrderedDict()  # least recently used first
        self.capacity = max(2, initial_rows)
        self.free: list[int] = list(range(1, self.capacity))  # row 0 = zeros (padding)
        self.table_max_ranks = table_max_ranks
        self.table_ratio = table_ratio
        self.current: BatchPlan | None = None
        self.stats = PoolStats()
        self._version = 0

    # -- adapters -------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self.adapters

    def __len__(self) -> int:
        return len(self.adapters)

    def add(self, key: str, lora: LoRA) -> Allocation:
        """Store ``lora`` under ``key`` (replacing an adapter of the same key)."""
        check_compatible(lora, self.model, source=lora.metadata.get("source") or key)
        if key in self.adapters:
            self.remove(key)
        rank = max((m.rank for m in lora.modules.values()), default=0)
        if rank == 0:
            raise LorafuseError(f"adapter {key!r} has no modules")
        rows = torch.tensor(self._take_rows(rank), dtype=torch.long)
        for path in lora.modules:
            if path not in self.banks:
                self._wrap(path)
        for path, bank in self.banks.items():
            module = lora.modules.get(path)
            if module is not None:
                bank.write(rows, module.A, module.B, module.scale)
        allocation = Allocation(key, rows, lora.num_params)
        self.adapters[key] = allocation
        self.stats.loads += 1
        return allocation

    def remove(self, key: str) -> None:
        allocation = self.adapters.pop(key)
        for bank in self.banks.values():
            bank.write(allocation.rows, None, None, 0.0)
        self.free.extend(allocation.rows.tolist())
        self.stats.evictions += 1

    def touch(self, key: str) -> Allocation:
        """Mark ``key`` as just used (LRU order) and return its allocation."""
        self.adapters.move_to_end(key)
        return self.adapters[key]

    def evict(self, keep: int) -> list[str]:
        """Evict least recently used adapters that no batch row uses until at most ``keep`` remain."""
        evicted = []
        for key in list(self.adapters):
            if len(self.adapters) <= keep:
                break
            if self.adapters[key].refs == 0:
                self.remove(key)
                evicted.append(key)
        return evicted

    def _take_rows(self, count: int) -> list[int]:
        while len(self.free) < count:
            old = self.capacity
            self.capacity *= 2
            for bank in self.banks.values():
                bank.resize(self.capacity)
            self.free.extend(range(old, self.capacity))
        self.free.sort()
        rows, self.free = self.free[:count], self.free[count:]
        return rows

    def _wrap(self, path: str) -> None:
        base = self.model.get_submodule(path)
        shape = linear_shape(base)
        if shape is None:
            raise LorafuseError(f"{path} is a {type(base).__name__}, not a linear layer")
        weight = base.weight
        dtype = self.dtype or weight.dtype
        A = torch.zeros(self.capacity, shape.in_features, dtype=dtype, device=weight.device)  # (N, in)
        B = torch.zeros(shape.out_features, self.capacity, dtype=dtype, device=weight.device)  # (out, N)
        bank = LoRABank(base, A, B, path, self)
        parent_path, _, child = path.rpartition(".")
        setattr(self.model.get_submodule(parent_path) if parent_path else self.model, child, bank)
        self.banks[path] = bank

    def detach(self) -> nn.Module:
        """Put every original layer back; the model is exactly the base again."""
        for path, bank in self.banks.items():
            parent_path, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent_path) if parent_path else self.model, child, bank.base)
        self.banks = {}
        self.adapters.clear()
        return self.model

    # -- plans ----------------------------------------------------------------------------------
    def coefficients(self, bank: LoRABank, x: Tensor) -> Coefficients | None:
        """The banks' source: the current plan's coefficients, ``None`` (base model) without one."""
        plan = self.current
        if plan is None:
            return None
        flat = x.ndim == 2 and x.shape[0] % plan.batch == 0
        if not flat and (x.ndim != 3 or x.shape[0] != plan.batch):
            raise LorafuseError(
                f"{bank.path}: the batch plan has {plan.batch} rows but the layer input is "
                f"{tuple(x.shape)}; set a plan for this batch (AdapterPool.use)"
            )
        self.stats.forwards[plan.kernel] += 1
        return plan.coefficients(bank, x)

    def plan(
        self, rows: Sequence[Sequence[tuple[str, float]]], dynamic: LayerInputSource | None = None
    ) -> BatchPlan:
        """A plan for a batch whose row b uses adapters ``rows[b] = [(key, weight), ...]``.

        An empty list is the base model for that row. Weights multiply the adapter's ranks.
        """
        batch = len(rows)
        allocations = [[(self.adapters[key], float(w)) for key, w in row] for row in rows]
        width = max([sum(a.rank for a, _ in row) for row in allocations] + [1])
        index = torch.zeros(batch, width, dtype=torch.long)  # (B, R)
        coef = torch.zeros(batch, width)  # (B, R)
        owner = torch.full((batch, width), -1, dtype=torch.long)  # (B, R)
        for b, row in enumerate(allocations):
            start = 0
            for part, (allocation, weight) in enumerate(row):
                stop = start + allocation.rank
                index[b, start:stop] = allocation.rows
                coef[b, start:stop] = weight
                owner[b, start:stop] = part
                start = stop
        used, position = torch.unique(index, return_inverse=True)  # (U,), (B, R)
        table = used.numel() <= max(self.table_max_ranks, self.table_ratio * width)
        self._version += 1
        return BatchPlan(
            index=index,
            coef=coef.unsqueeze(1),  # (B, 1, R)
            owner=owner,
            used=used,
            position=position,
            kernel="table" if table else "gathered",
            version=self._version,
            dynamic=dynamic,
        )

    def use(self, plan: BatchPlan | None) -> _UsePlan:
        """``with pool.use(plan): model(...)`` — forward passes inside use ``plan``."""
        return _UsePlan(self, plan)


class _UsePlan:
    def __init__(self, pool: AdapterPool, plan: BatchPlan | None) -> None:
        self.pool = pool
        self.plan = plan
        self.previous: BatchPlan | None = None

    def __enter__(self) -> BatchPlan | None:
        self.previous = self.pool.current
        self._switch(self.previous, self.plan)
        return self.plan

    def __exit__(self, *exc: object) -> None:
        self._switch(self.plan, self.previous)

    def _switch(self, old: BatchPlan | None, new: BatchPlan | None) -> None:
        """Make ``new`` current; only the current plan's weight rules listen to forward passes."""
        if old is not None and old.dynamic is not None:
            old.dynamic.enabled = False
        if new is not None and new.dynamic is not None:
            new.dynamic.enabled = True
        self.pool.current = new
