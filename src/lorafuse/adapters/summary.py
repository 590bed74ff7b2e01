"""Summaries of adapters for ``lorafuse inspect``: ranks, alphas, scales, sizes, ΔW norms."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from lorafuse.adapters.lora import LoRA, module_kind


def _distinct(values: list[float]) -> list[float]:
    return sorted({float(f"{v:.6g}") for v in values})


def summarize_lora(lora: LoRA) -> dict[str, Any]:
    """A JSON-ready summary of ``lora``.

    ``delta_norms`` gives, per module kind (``q_proj``, ``c_attn``, ...), the number of modules
    and the mean, max and root-sum-square of ``‖s · B A‖_F``, computed in factored form.
    """
    norms: dict[str, list[float]] = defaultdict(list)
    ranks: dict[str, set[int]] = defaultdict(set)
    for path, module in lora.modules.items():
        norms[module_kind(path)].append(module.fro_norm())
        ranks[module_kind(path)].add(module.rank)
    modules = list(lora.modules.values())
    first = modules[0]
    return {
        "name": lora.name,
        "source": lora.metadata.get("source"),
        "base_model": lora.base_model,
        "ranks": sorted({m.rank for m in modules}),
        "alphas": _distinct([m.scale * m.rank for m in modules]),
        "scales": _distinct([m.scale for m in modules]),
        "target_modules": lora.module_kinds,
        "num_modules": len(modules),
        "num_params": lora.num_params,
        "dtype": str(first.A.dtype).removeprefix("torch."),
        "delta_norms": {
            kind: {
                "modules": len(values),
                "ranks": sorted(ranks[kind]),
                "mean": sum(values) / len(values),
                "max": max(values),
                "total": math.sqrt(sum(v * v for v in values)),
            }
            for kind, values in sorted(norms.items())
        },
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable text of :func:`summarize_lora`'s output."""

    def join(values: list[Any]) -> str:
        return ", ".join(str(v) for v in values)

    lines = [
        f"{summary['source'] or summary['name']}",
        f"  base model      {summary['base_model'] or '(not recorded)'}",
        f"  rank(s)         {join(summary['ranks'])}",
        f"  alpha(s)        {join(summary['alphas'])}",
        f"  scale(s)        {join(summary['scales'])}",
        f"  target modules  {join(summary['target_modules'])} ({summary['num_modules']} modules)",
        f"  parameters      {summary['num_params']:,} ({summary['dtype']})",
        "  ‖ΔW‖_F per module kind:",
        f"    {'kind':<14}{'modules':>8}{'rank':>8}{'mean':>12}{'max':>12}{'total':>12}",
    ]
    for kind, row in summary["delta_norms"].items():
        lines.append(
            f"    {kind:<14}{row['modules']:>8}{join(row['ranks']):>8}"
            f"{row['mean']:>12.4g}{row['max']:>12.4g}{row['total']:>12.4g}"
        )
    return "\n".join(lines)
