"""The recycling study's report: tables and a plot from its result (:mod:`lorafuse.studies.recycle`).

A result is ``{"runs": [...], "rules", "ks", "methods", "composites", "seeds", "pool", "complete"}``;
each run holds its composite, seed, selection rule (or a control), k, method and scores. Nothing
here trains or reads files: the functions take the result dict only.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

METHOD_LABELS = {"lorahub": "LoraHub", "cat-weights": "learned CAT", "lora-flow": "LoRA-Flow"}
RANDOM_WEIGHTS = "random weights (loss's choice)"
FRESH = "fresh LoRA"


def numbers(result: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The study's numbers without timings: what a rerun with the same seeds must reproduce."""
    keys = ("composite", "seed", "rule", "k", "method", "exact_match", "final_answer_match", "dev_loss")
    return [tuple(json.dumps(r.get(key)) for key in keys) + tuple(r["loras"]) for r in result["runs"]]


#: The scores every run records: key → (label, format of a cell).
METRICS = {
    "exact_match": ("exact match of the whole answer (%)", ".1f"),
    "final_answer_match": ("exact match of the final answer alone (%)", ".1f"),
    "dev_loss": ("dev loss (mean response-token cross-entropy; lower is better)", ".3f"),
}


def metrics_of(result: dict[str, Any]) -> list[str]:
    """The :data:`METRICS` that the result's runs record (the final answer: the faithful family)."""
    return [m for m in METRICS if result["runs"] and all(m in run for run in result["runs"])] or [
        "exact_match"
    ]


def cells(
    result: dict[str, Any], metric: str = "exact_match"
) -> dict[tuple[str, str, str], dict[str, list[float]]]:
    """``(rule, k, method)`` → composite → the ``metric``'s scores over seeds (table rows, in order)."""
    out: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    rows = [*result["rules"], RANDOM_WEIGHTS]
    for rule in rows:
        for k in result["ks"]:
            for method in result["methods"]:
                out[(rule, k, method)] = {c: [] for c in result["composites"]}
    out[(FRESH, "—", FRESH)] = {c: [] for c in result["composites"]}
    for run in result["runs"]:
        key = (run["rule"], "—" if run["k"] is None else str(run["k"]), run["method"])
        out.setdefault(key, {c: [] for c in result["composites"]})[run["composite"]].append(run[metric])
    return out


def _cell(values: list[float], fmt: str = ".1f") -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def format_recycle_study(result: dict[str, Any]) -> str:
    """Markdown tables, one per recorded metric (:func:`metrics_of`): mean ± std over seeds per
    rule × k × method, and the two controls."""
    composites = result["composites"]
    kinds = ", ".join(f"{n} {kind}" for kind, n in result["pool"]["kinds"].items())
    lines = [
        f"Recycling study: pool of {len(result['pool']['loras'])} LoRAs ({kinds}); "
        f"mean ± std over seeds {result['seeds']}.",
        *(
            []
            if result.get("complete", True)
            else ["", f"**Under way**: {len(result['runs'])} runs so far; a cell without runs shows —."]
        ),
    ]
    for metric in metrics_of(result):
        label, fmt = METRICS[metric]
        lines += [
            "",
            f"{label[0].upper()}{label[1:]}:",
            "",
            "| selection | k | method | " + " | ".join(composites) + " | mean |",
            "| --- | --- | --- | " + " | ".join("---:" for _ in composites) + " | ---: |",
        ]
        for (rule, k, method), scores in cells(result, metric).items():
            every = [v for c in composites for v in scores[c]]
            mean = f"{statistics.mean(every):{fmt}}" if every else "—"
            name = METHOD_LABELS.get(method, method)
            row = " | ".join(_cell(scores[c], fmt) for c in composites)
            lines.append(f"| {rule} | {k} | {name} | {row} | {mean} |")
    return "\n".join(lines)


def seed_means(result: dict[str, Any], metric: str, rule: str, k: str, method: str) -> list[float]:
    """Per seed (in ``result["seeds"]`` order), the mean of ``metric`` over the composites' runs
    of one ``(rule, k, method)`` cell; seeds without a run are left out."""
    by_seed: dict[int, list[float]] = {}
    for run in result["runs"]:
        run_k = "—" if run["k"] is None else str(run["k"])
        if (run["rule"], run_k, run["method"]) == (rule, k, method):
            by_seed.setdefault(run["seed"], []).append(run[metric])
    return [statistics.mean(by_seed[s]) for s in result["seeds"] if s in by_seed]


def format_by_k(result: dict[str, Any], metric: str = "exact_match") -> str:
    """A compact Markdown table of one score: a row per selection rule × method, a column per k,
    each cell the mean over composites and seeds; once the study is complete with several seeds,
    ``± s`` beside it, ``s`` the standard deviation over seeds of each seed's mean over the
    composites (while it is under way, the number of runs instead); the fresh LoRA last."""
    label, fmt = METRICS[metric]
    complete = result.get("complete", True)
    lines = [
        f"| selection | method | {' | '.join(f'k = {k}' for k in result['ks'])} |",
        "| --- | --- | " + " | ".join("---:" for _ in result["ks"]) + " |",
    ]

    def cell(rule: str, k: str, method: str) -> str:
        values = [
            run[metric]
            for run in result["runs"]
            if (run["rule"], "—" if run["k"] is None else str(run["k"]), run["method"]) == (rule, k, method)
        ]
        if not values:
            return "—"
        text = f"{statistics.mean(values):{fmt}}"
        if not complete:
            return f"{text} ({len(values)})"
        per_seed = seed_means(result, metric, rule, k, method)
        return f"{text} ± {statistics.stdev(per_seed):{fmt}}" if len(per_seed) > 1 else text

    for rule in [*result["rules"], RANDOM_WEIGHTS]:
        for method in result["methods"]:
            row = [cell(rule, str(k), method) for k in result["ks"]]
            lines.append(f"| {rule} | {METHOD_LABELS.get(method, method)} | " + " | ".join(row) + " |")
    fresh = cell(FRESH, "—", FRESH)
    lines.append(f"| {FRESH} | — | " + " | ".join(fresh for _ in result["ks"]) + " |")
    spread = complete and len({run["seed"] for run in result["runs"]}) > 1
    what = "mean over composites and seeds" + (" ± std over seeds of the composites' mean" if spread else "")
    return f"{label[0].upper()}{label[1:]}, {what}:\n\n" + "\n".join(lines)


def plot_recycle(result: dict[str, Any], path: Path) -> Path:
    """Score against k, one panel per method and recorded metric (rows), one line per selection
    rule; the random-weights control dotted, the fresh LoRA dashed."""
    from lorafuse._extras import require

    matplotlib = require("matplotlib", "study", "the recycling study's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = result["ks"]
    metrics = metrics_of(result)
    fig, axes = plt.subplots(
        len(metrics),
        len(result["methods"]),
        figsize=(4.2 * len(result["methods"]), 3.4 * len(metrics)),
        squeeze=False,
        sharey="row",  # one scale per score: the methods side by side
    )
    for row, metric in enumerate(metrics):
        table = cells(result, metric)
        fresh = [v for vs in table[(FRESH, "—", FRESH)].values() for v in vs]
        for ax, method in zip(axes[row], result["methods"], strict=True):
            for rule in [*result["rules"], RANDOM_WEIGHTS]:
                means = []
                for k in ks:
                    values = [v for vs in table[(rule, k, method)].values() for v in vs]
                    means.append(statistics.mean(values) if values else float("nan"))
                style = ":" if rule == RANDOM_WEIGHTS else "-"
                ax.plot(range(len(ks)), means, style, marker="o", label=rule)
            if fresh:
                ax.axhline(statistics.mean(fresh), color="k", linestyle="--", label=FRESH)
            ax.set_xticks(range(len(ks)), ks)
            ax.set_xlabel("k (LoRAs chosen)")
            ax.set_title(METHOD_LABELS.get(method, method), fontsize=10)
        axes[row][0].set_ylabel(METRICS[metric][0].split(" (mean")[0], fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "FRESH",
    "METHOD_LABELS",
    "METRICS",
    "RANDOM_WEIGHTS",
    "cells",
    "format_by_k",
    "format_recycle_study",
    "metrics_of",
    "numbers",
    "plot_recycle",
    "seed_means",
]
