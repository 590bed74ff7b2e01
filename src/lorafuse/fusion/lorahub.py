"""LoraHub (Huang et al. 2023, arXiv 2307.13269): gradient-free search of one weight per LoRA.

Minimises ``loss(w) + λ · mean|w|`` over ``w ∈ [-1.5, 1.5]^k`` with nevergrad's ``NGOpt``, starting
at ``w = 0`` (λ = 0.05, budget 40 evaluations, as in the paper's code). Unlike the original, which
mixes ``A`` and ``B`` separately (``(Σ w_i B_i)(Σ w_i A_i)``, with cross terms), the bank applies the
exact ``Σ w_i s_i B_i A_i``.

Known issue: with numpy 2, nevergrad 1.0.12's ``NGOpt`` can fail inside its metamodel (it calls
``float`` on a 1-element array); when it does, the search goes on with ``TwoPointsDE``, told every
point evaluated so far.

At the default budget the search is deterministic: with nevergrad 1.0.12, ``NGOpt`` with 40
evaluations delegates to Cobyla (from ``w = 0``) for 2, 8 and 63 weights alike, so ``seed`` does
not change the weights found.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

log = logging.getLogger("lorafuse.notices")  # shown to CLI users on stderr (lorafuse.cli.main)


@dataclass(frozen=True)
class LoraHubConfig:
    budget: int = 40
    bound: float = 1.5
    l1: float = 0.05
    seed: int = 0


def lorahub_search(
    loss_of: Callable[[torch.Tensor], float],
    k: int,
    config: LoraHubConfig = LoraHubConfig(),
    *,
    progress: bool = True,
) -> tuple[torch.Tensor, list[float]]:
    """Best weights ``(k,)`` found and the objective of every evaluation.

    ``loss_of(w)`` is the task loss with bank weights ``w``; the objective adds ``l1 · mean|w|``.
    """
    import warnings

    from lorafuse._extras import require

    ng = require("nevergrad", "study", "LoraHub fusion (--method lorahub)")
    if config.budget < k + 2:
        log.warning(
            "lorahub: %d weights searched with %d evaluations; a budget of %d or more "
            "(fuse --budget) lets the search try each weight",
            k,
            config.budget,
            k + 2,
        )

    # nevergrad's Cobyla chatter (its step size, and a budget below k + 2 evaluations)
    warnings.filterwarnings("ignore", message=".*RHOEND.*")
    warnings.filterwarnings("ignore", message=".*Invalid MAXFUN.*")

    def make(name: str):  # type: ignore[no-untyped-def]
        parametrization = ng.p.Array(init=np.zeros(k), lower=-config.bound, upper=config.bound)
        parametrization.random_state = np.random.RandomState(config.seed)
        return ng.optimizers.registry[name](parametrization=parametrization, budget=config.budget)

    optimizer = make("NGOpt")
    told: list[tuple[np.ndarray, float]] = []
    history: list[float] = []
    best_w, best_value = np.zeros(k), float("inf")
    for _ in tqdm(range(config.budget), desc="lorahub", unit="eval", disable=not progress, leave=False):
        try:
            candidate = optimizer.ask()
        except TypeError:  # nevergrad's metamodel under numpy 2 (see the module docstring)
            optimizer = _fallback(make, told)
            candidate = optimizer.ask()
        w = np.asarray(candidate.value, dtype=np.float64)
        value = float(loss_of(torch.tensor(w, dtype=torch.float32))) + config.l1 * float(np.abs(w).mean())
        try:
            optimizer.tell(candidate, value)
        except TypeError:
            optimizer = _fallback(make, told)
        told.append((w, value))
        history.append(value)
        if value < best_value:
            best_w, best_value = w, value
    _stop_threads(optimizer)
    return torch.tensor(best_w, dtype=torch.float32), history


def _fallback(make, told: list[tuple[np.ndarray, float]]):  # type: ignore[no-untyped-def]
    """Continue the search with ``TwoPointsDE``, told every point evaluated so far."""
    optimizer = make("TwoPointsDE")
    for w, value in told:
        optimizer.tell(optimizer.parametrization.spawn_child(new_value=w), value)
    return optimizer


def _stop_threads(optimizer: object) -> None:
    """End the worker threads of nevergrad's recast optimizers (CMA, Powell, ...) that NGOpt may
    start: they are not daemons, so a process would otherwise hang at exit waiting for them."""
    import gc
    import threading

    del optimizer
    gc.collect()
    for thread in threading.enumerate():
        if type(thread).__name__ == "_MessagingThread":
            thread.stop()  # type: ignore[attr-defined]
