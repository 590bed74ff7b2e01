"""``merge``: run a registered method over every module of several LoRAs, one module at a time.

Validation first (same module shapes, same targets unless ``union``, same recorded base unless
``allow_different_bases``), then a loop over modules with a progress bar; peak memory is one
module's factors (plus one dense ``ΔW`` stack for the sparsifying methods). The result is a
:class:`~lorafuse.adapters.LoRA` with scale 1 that ``save_lora`` writes as a PEFT folder.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from lorafuse._checks import MAX_MAGNITUDE, InvalidValueError, check_number
from lorafuse._io import versions
from lorafuse.adapters.lora import LoRA, LoRAModule
from lorafuse.merging.registry import get_method


def module_generator(seed: int, path: str) -> torch.Generator:
    """The generator of one module's random draws (DARE's masks, the randomized SVD, k-means).

    Seeded by ``seed`` and the module path only, so a module's result does not depend on which
    other modules are merged or in what order.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(path.encode()))


def _check_inputs(loras: Sequence[LoRA], union: bool, allow_different_bases: bool) -> list[str]:
    names = [lo.name or f"lora{i}" for i, lo in enumerate(loras)]
    bases = {lo.base_model for lo in loras if lo.base_model}
    if len(bases) > 1 and not allow_different_bases:
        listing = ", ".join(f"{n}: {lo.base_model}" for n, lo in zip(names, loras, strict=True))
        raise ValueError(
            f"the LoRAs were trained on different base models ({listing}); merging them is only "
            "meaningful on one base. Pass allow_different_bases=True (--allow-different-bases) "
            "if these names refer to the same weights."
        )
    paths = [set(lo.modules) for lo in loras]
    if not union and any(p != paths[0] for p in paths[1:]):
        lines = []
        for name, p in zip(names, paths, strict=True):
            missing = sorted(set().union(*paths) - p)
            if missing:
                shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                lines.append(f"  {name} lacks {shown}")
        raise ValueError(
            "the LoRAs adapt different modules:\n" + "\n".join(lines) + "\nPass union=True (--union) "
            "to merge the union, a missing module counting as ΔW = 0 for that LoRA."
        )
    for path in set().union(*paths):
        shapes = {(lo[path].out_features, lo[path].in_features) for lo in loras if path in lo.modules}
        if len(shapes) > 1:
            found = ", ".join(
                f"{n}: {(lo[path].out_features, lo[path].in_features)}"
                for n, lo in zip(names, loras, strict=True)
                if path in lo.modules
            )
            raise ValueError(f"{path}: the LoRAs disagree on the layer shape (out, in): {found}")
    return names


def merge(
    loras: Sequence[LoRA] | Mapping[str, LoRA],
    method: str,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    *,
    union: bool = False,
    allow_different_bases: bool = False,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    **params: Any,
) -> LoRA:
    """Merge ``loras`` into one LoRA with a registered ``method`` (see ``MERGE_METHODS``).

    Args:
        loras: the adapters (a list, or ``{name: LoRA}``).
        method: ``cat``, ``linear``, ``svd``, ``ties``, ``dare-linear``, ``dare-ties``,
            ``magnitude-prune`` or ``lego`` (the underscore spellings ``dare_ties``, ... and
            ``task_arithmetic`` for ``linear`` are accepted; the canonical name is recorded).
        weights: one weight per LoRA (default all 1); any sign.
        rank: output rank ``K`` (default: ``Σ r_i`` for ``cat``, the exact rank for ``linear``,
            ``max r_i`` otherwise).
        union: merge LoRAs that adapt different modules (missing = zero).
        seed: seeds DARE's masks, the randomized SVD and k-means (per module, order-free).
        dtype: dtype of the merged factors (default: the inputs' dtype).
        **params: the method's settings (``density``, ``majority_sign_method``, ``convention``,
            ``n_init``, ...), validated against its pydantic model.
    """
    lora_list = list(loras.values()) if isinstance(loras, Mapping) else list(loras)
    if not lora_list:
        raise ValueError("merge needs at least one LoRA")
    spec = get_method(method)
    method = spec.name  # canonical spelling, whatever alias was given
    settings = spec.params(**params)
    weights = [1.0] * len(lora_list) if weights is None else list(weights)
    if len(weights) != len(lora_list):
        raise ValueError(f"got {len(weights)} weights for {len(lora_list)} LoRAs")
    weights = [
        float(check_number(w, f"merge weight {i + 1}", low=-MAX_MAGNITUDE, high=MAX_MAGNITUDE))
        for i, w in enumerate(weights)
    ]
    if rank is not None:
        rank = int(check_number(rank, "merge rank", integer=True, low=1))
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidValueError(
            f"merge dtype must be a floating-point torch dtype (float32, float16, bfloat16), got "
            f"{dtype}; a LoRA's factors are real numbers and PEFT and lorafuse load only float adapters"
        )
    names = _check_inputs(lora_list, union, allow_different_bases)
    out_dtype = dtype or next(iter(lora_list[0].modules.values())).A.dtype

    paths = sorted(set().union(*(lo.modules for lo in lora_list)))
    modules: dict[str, LoRAModule] = {}
    for path in tqdm(paths, desc=f"merge ({method})", unit="module", disable=not progress):
        present = [
            (lo[path].A, lo[path].B, lo[path].scale, w)
            for lo, w in zip(lora_list, weights, strict=True)
            if path in lo.modules
        ]
        generator = module_generator(seed, path)
        b, a = spec.fn(
            [(A, B, s) for A, B, s, _ in present],
            [w for *_, w in present],
            rank,
            settings,
            generator,
        )
        a, b = a.to(out_dtype).contiguous(), b.to(out_dtype).contiguous()
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise InvalidValueError(
                f"{path}: the merged factors are not finite in {out_dtype} (the weights {weights} "
                "or the adapters' scales are too large for it)"
            )
        modules[path] = LoRAModule(a, b, 1.0)

    bases = {lo.base_model for lo in lora_list if lo.base_model}
    recipe = {
        "merge_method": method,
        "models": [
            {"adapter": lo.metadata.get("source") or n, "weight": w}
            for n, lo, w in zip(names, lora_list, weights, strict=True)
        ],
        "rank": rank,
        "parameters": settings.model_dump(),
        "union": union,
        "seed": seed,
    }
    return LoRA(
        modules,
        base_model=next(iter(bases)) if bases else None,
        name=f"{method}({','.join(names)})",
        metadata={"task_type": "CAUSAL_LM", "lorafuse": {"recipe": recipe, "versions": versions()}},
    )
