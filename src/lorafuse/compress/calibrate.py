"""Calibration: the Hessian ``H = (1/n) Σ x xᵀ`` of every linear layer's inputs over sample text.

Forward pre-hooks on ``nn.Linear`` modules accumulate ``xᵀx`` (fp64) while a model reads the
calibration sequences, one at a time (no padding enters ``H``). Any ``nn.Module`` works: this
file imports no transformers. Memory is ``in²`` per layer, so a 7B model (224 layers of width up
to 11008) needs its layers calibrated a few at a time; at skill-world sizes all fit at once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    sequences: Iterable[Tensor],
    paths: Iterable[str] | None = None,
    *,
    progress: bool = True,
) -> dict[str, Tensor]:
    """``{module path: H (in, in)}`` for the ``nn.Linear`` layers named in ``paths`` (default all)."""
    wanted = None if paths is None else set(paths)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def make_hook(path: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
            sums[path] = sums.get(path, 0) + x.T @ x  # type: ignore[operator]
            counts[path] = counts.get(path, 0) + x.shape[0]

        return hook

    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and (wanted is None or path in wanted):
            hooks.append(module.register_forward_pre_hook(make_hook(path)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for ids in tqdm(list(sequences), desc="calibrate", unit="seq", disable=not progress, leave=False):
            model(input_ids=ids.reshape(1, -1).to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {p: (sums[p] / counts[p]).float() for p in sums}


def output_energy(M: Tensor, hessian: Tensor | None, dtype: torch.dtype = torch.float64) -> float:
    """``tr(M H Mᵀ) = ‖M X‖_F² / n`` for ``M (out, in)`` (``‖M‖_F²`` when ``hessian`` is None)."""
    M = M.to(dtype)
    if hessian is None:
        return float((M * M).sum())
    return float(((M @ hessian.to(dtype)) * M).sum())


def activation_error(delta: Tensor, approx: Tensor, hessian: Tensor) -> float:
    """``‖(ΔW − ΔŴ) X‖_F / ‖ΔW X‖_F`` from ``H = X Xᵀ/n``: ``√(tr(E H Eᵀ) / tr(ΔW H ΔWᵀ))``."""
    num = output_energy(approx.double() - delta.double(), hessian)
    den = output_energy(delta, hessian)
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0
