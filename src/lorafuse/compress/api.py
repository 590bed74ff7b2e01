"""Compress a fine-tuned checkpoint against its base, write it back as a model, apply it in place.

``compress_checkpoint`` streams both checkpoints tensor by tensor (two tensors in memory, never
two models), compresses each attention/MLP projection's ``ΔW = W_ft − W_base`` with a registered
method at ``budget × 2·out·in`` bytes, reports every other tensor that changed (embeddings,
norms, LM head: kept from the base, or stored as plain deltas with ``keep_other="delta"``), and
writes the folder atomically — any error leaves no output behind.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import Tensor, nn
from tqdm.auto import tqdm

from lorafuse._io import (
    OutputInputs,
    atomic_output_dir,
    combine_inputs,
    prepare_output,
    write_json,
    write_safetensors,
)
from lorafuse.compress.budget import budget_nbytes, parse_budget
from lorafuse.compress.calibrate import activation_error
from lorafuse.compress.checkpoint import (
    ShardReader,
    check_pair,
    is_linear,
    iter_pairs,
    iter_tensors,
    open_checkpoint,
)
from lorafuse.compress.format import CompressedDelta, PackedModules, load_compressed, save_compressed
from lorafuse.compress.registry import get_method
from lorafuse.compress.sequential import iter_layer_hessians
from lorafuse.compress.types import HalfFactors
from lorafuse.errors import BudgetError, CompressError


def compress_checkpoint(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    method: str = "delta-come",
    budget: str | float = "1/16",
    hessians: Mapping[str, Tensor] | None = None,
    calibration: Sequence[Tensor] | None = None,
    keep_other: Literal["base", "delta"] = "base",
    params: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    inputs: OutputInputs = (),
) -> CompressedDelta:
    """Compress ``finetuned − base``; write it to ``out`` (if given) and return it.

    ``out`` must not be, contain or lie inside ``base``, ``finetuned`` or any of ``inputs``
    (calibration text, tokenizer); that is checked before any work.

    Args:
        method: ``delta-come``, ``low-rank``, ``bitdelta`` or ``rtn`` (``COMPRESS_METHODS``).
        budget: a ratio of the fp16 delta's bytes, ``"1/16"``, ``"1/32"``, ``0.05``, per module.
        hessians: ``{module path: H (in, in)}`` from :func:`collect_hessians` (GPTQ, errors).
        calibration: token id sequences (1-D tensors) read by the fine-tuned model **layer by
            layer** (:func:`~lorafuse.compress.sequential.iter_layer_hessians`): each decoder
            layer's Hessians are collected, its projections compressed, then freed, so peak
            memory is one layer's worth whatever the depth. Use this or ``hessians``. A mixture
            of experts' per-expert weights get the Hessian of the tokens routed to each expert.
            With either, each stored module's report says ``calibrated`` (whether it had a
            Hessian: an expert no calibration token reached has none) and ``info["uncalibrated"]``
            lists those compressed without one (by weight error only).
        device: where the SVD, GPTQ and calibration run (``"cuda"`` on a GPU); results are
            stored on the CPU.
        keep_other: non-linear tensors that changed: ``base`` keeps the base's values (and reports
            the change), ``delta`` stores their plain fp32 delta.
        params: the method's settings (``schedule``, ``quantizer``, ``group_size``, ...).
    """
    spec = get_method(method)
    try:
        settings = spec.params(**dict(params or {}))
    except ValidationError as exc:
        raise CompressError(f"{method}: bad settings: {exc}") from None
    ratio = parse_budget(budget)
    if keep_other not in ("base", "delta"):
        raise CompressError(f"keep_other must be 'base' or 'delta', got {keep_other!r}")
    if hessians is not None and calibration is not None:
        raise CompressError("give either hessians or calibration sequences, not both")
    device = torch.device(device)
    sources = combine_inputs({"base": base, "finetuned": finetuned}, inputs)
    if out is not None:
        prepare_output(out, sources, overwrite=overwrite)
    ck_base, ck_ft = open_checkpoint(base), open_checkpoint(finetuned)
    check_pair(ck_base, ck_ft)
    started = time.perf_counter()
    calibrated = hessians is not None or calibration is not None
    modules, other, report = PackedModules(), {}, {}
    kept: dict[str, dict[str, Any]] = {}

    def compress_linear(key: str, w_base: Tensor, w_ft: Tensor, H: Tensor | None) -> None:
        diff = w_ft.to(device, torch.float32) - w_base.to(device, torch.float32)  # (out, in)
        path = key.removesuffix(".weight")
        allowed = budget_nbytes(*diff.shape, ratio)
        if not bool(diff.any()):  # an untouched layer (a frozen router, say): nothing to store
            report[path] = {
                "shape": list(diff.shape),
                "nbytes": 0,
                "budget_nbytes": allowed,
                "choice": "zero",
            }
            return
        H = None if H is None else H.to(device)
        try:
            module = spec.fn(diff, H, allowed, settings, path)
            choice = getattr(module, "label", None)
        except BudgetError:
            if min(diff.shape) > THIN or max(diff.shape) < 16 * min(diff.shape):
                raise  # a real layer whose budget is too small: the user must raise --budget
            # A matrix too thin for one singular vector at this budget (a MoE router, 8 × 4096):
            # kept exactly as full-rank fp16 factors, over its share, and said so in the report.
            module = full_rank_half(diff)
            choice = "full-rank fp16 (too small for the budget)"
        approx = module.delta()
        entry = {
            "shape": list(diff.shape),
            "nbytes": module.nbytes,
            "budget_nbytes": allowed,
            "weight_error": float((approx - diff).norm() / diff.norm().clamp_min(1e-30)),
            "kind": module.kind,
        }
        if choice:
            entry["choice"] = choice
        if calibrated:
            entry["calibrated"] = H is not None
        if H is not None:
            entry["activation_error"] = activation_error(diff, approx, H)
        modules.add(path, module)  # packed, on the CPU
        report[path] = entry

    bar = tqdm(total=len(ck_ft.shapes), desc=f"compress ({method})", unit="tensor", disable=not progress)
    done: set[str] = set()
    if calibration is not None:
        with ShardReader(ck_base) as read_base, ShardReader(ck_ft) as read_ft:
            for _, layer_hessians in iter_layer_hessians(
                finetuned, calibration, device=device, progress=False
            ):
                for path, H in layer_hessians.items():
                    key = f"{path}.weight"
                    if key in ck_ft.shapes and is_linear(key, ck_ft.shapes[key]):
                        compress_linear(key, read_base.get(key), read_ft.get(key), H)
                        done.add(key)
                        bar.update()
    for key, w_base, w_ft in iter_pairs(ck_base, ck_ft, skip=done):
        if is_linear(key, tuple(w_ft.shape)):
            path = key.removesuffix(".weight")
            compress_linear(key, w_base, w_ft, hessians.get(path) if hessians is not None else None)
            bar.update()
            continue
        diff = w_ft.float() - w_base.float()
        if bool(diff.any()):
            kept[key] = {
                "shape": list(diff.shape),
                "relative_change": float(diff.norm() / w_ft.float().norm().clamp_min(1e-30)),
                "action": "stored as a plain delta" if keep_other == "delta" else "kept from the base",
            }
            if keep_other == "delta":
                other[key] = diff
        bar.update()
    bar.close()
    info = {
        "base": str(base),
        "finetuned": str(finetuned),
        "architecture": ck_ft.architecture,
        "keep_other": keep_other,
        "calibrated": calibrated,
        "calibration": "layer by layer" if calibration is not None else ("given" if hessians else None),
        "uncalibrated": sorted(p for p, e in report.items() if e.get("calibrated") is False),
        "seconds": round(time.perf_counter() - started, 2),
        "modules": report,
        "changed_other_tensors": kept,
    }
    result = CompressedDelta(method, settings.model_dump(), ratio, modules, other, info)
    if out is not None:
        save_compressed(result, out, overwrite=overwrite, inputs=sources)
        result.info["path"] = str(out)
    return result


THIN = 64  # a delta this thin (≤ 64 rows or columns, 16× longer) may be stored whole over budget


def full_rank_half(delta: Tensor) -> HalfFactors:
    """``ΔW`` exactly (to fp16) as ``B A`` of rank ``min(out, in)``: an identity on the thin side."""
    out, in_ = delta.shape
    if out <= in_:
        return HalfFactors(torch.eye(out).half(), delta.half(), label="full-rank")
    return HalfFactors(delta.half(), torch.eye(in_).half(), label="full-rank")


def decompress(
    compressed: str | os.PathLike[str] | CompressedDelta,
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``base + ΔŴ`` as a HuggingFace folder (the base's shards, config and other files).

    ``out`` must not be, contain or lie inside ``base`` or the ``compressed`` folder.
    """
    sources = combine_inputs(
        {"base": base}, [] if isinstance(compressed, CompressedDelta) else {"compressed": compressed}
    )
    prepare_output(out, sources, overwrite=overwrite)
    delta = compressed if isinstance(compressed, CompressedDelta) else load_compressed(compressed)
    ck = open_checkpoint(base)
    problems = []
    for path, m in delta.modules.items():
        key = f"{path}.weight"
        if ck.shapes.get(key) != tuple(m.shape):
            problems.append(f"{key}: delta {tuple(m.shape)}, base {ck.shapes.get(key, 'missing')}")
    for key, t in delta.other.items():
        if ck.shapes.get(key) != tuple(t.shape):
            problems.append(f"{key}: delta {tuple(t.shape)}, base {ck.shapes.get(key, 'missing')}")
    if problems:
        raise CompressError(f"{base} does not match the compressed delta:\n  " + "\n  ".join(problems[:12]))
    with atomic_output_dir(out, overwrite=overwrite, inputs=sources) as tmp:
        for item in ck.root.iterdir():
            if item.is_file() and item.suffix != ".safetensors":
                shutil.copy2(item, tmp / item.name)
        count = len(set(ck.shards.values()))
        for shard, tensors in tqdm(  # one shard in memory at a time
            iter_tensors(ck), total=count, desc="decompress", unit="shard", disable=not progress
        ):
            for key, w in tensors.items():
                path = key.removesuffix(".weight")
                if path in delta.modules and key.endswith(".weight"):
                    tensors[key] = (w.float() + delta.modules[path].delta()).to(w.dtype)
                elif key in delta.other:
                    tensors[key] = (w.float() + delta.other[key].float()).to(w.dtype)
            write_safetensors(tensors, tmp / shard.name, metadata={"format": "pt"})
        write_json(
            {"decompressed_from": delta.info.get("path"), "method": delta.method, "base": str(base)},
            tmp / "lorafuse.json",
        )
    return Path(out)


@torch.no_grad()
def apply_delta(
    model: nn.Module, delta: CompressedDelta, *, linear: bool = True, other: bool = True
) -> nn.Module:
    """Add ``ΔŴ`` to ``model``'s weights in place, one module at a time (dense methods' serving path).

    ``linear`` adds the compressed layers (materialising each ``ΔŴ``), ``other`` the plain
    deltas of non-linear tensors. Parameter names are the checkpoint's tensor names.
    """
    params = dict(model.named_parameters())
    targets = []
    if linear:
        targets += [(f"{p}.weight", m.delta) for p, m in delta.modules.items()]
    if other:
        targets += [(k, (lambda t=t: t)) for k, t in delta.other.items()]
    for key, make in targets:
        if key not in params:
            raise CompressError(f"the model has no parameter {key} (from {delta.info.get('path')})")
        d = make()
        if tuple(d.shape) != tuple(params[key].shape):
            raise CompressError(f"{key}: model {tuple(params[key].shape)}, delta {tuple(d.shape)}")
        params[key].add_(d.to(params[key].dtype))
    return model
