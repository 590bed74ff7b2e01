"""The composition study's report: a Markdown table, the JSON record, a bar chart PNG and an HTML page."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from lorafuse._io import OutputInputs, atomic_output_dir, versions


def cell(values: list[float], seeded: bool) -> str:
    """``mean ± std`` over seeds for trained rows, the single value otherwise."""
    if not values:
        return "—"
    if seeded and len(values) > 1:
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
    return f"{statistics.mean(values):.1f}"


def row_means(result: dict[str, Any]) -> dict[str, float]:
    """Mean over composites of each row's mean over seeds (the table's ``avg`` column)."""
    out = {}
    for row in result["rows"]:
        means = [
            statistics.mean(result["results"][c][row])
            for c in result["composites"]
            if result["results"][c][row]
        ]
        out[row] = statistics.mean(means) if means else float("nan")
    return out


def format_table(result: dict[str, Any]) -> str:
    """Rows = methods, columns = composite tasks + their average (the LoRA-Flow paper's table, in kind)."""
    composites = result["composites"]
    seeded = set(result["seeded_rows"])
    avg = row_means(result)
    lines = [
        "| method | " + " | ".join(composites) + " | avg |",
        "| --- | " + " | ".join("---:" for _ in composites) + " | ---: |",
    ]
    for row in result["rows"]:
        cells = [cell(result["results"][c][row], row in seeded) for c in composites]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {avg[row]:.1f} |")
    return "\n".join(lines)


def bar_chart(result: dict[str, Any], path: Path | None, *, fig: Any = None) -> None:
    """Grouped bars: one group per composite task (and the average), one bar per method, ± std.

    Saved to ``path``, or drawn into ``fig`` (a matplotlib figure) when given.
    """
    from lorafuse._extras import require

    matplotlib = require("matplotlib", "study", "the study's bar chart")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    composites = [*result["composites"], "avg"]
    rows = result["rows"]
    own = fig is None
    if own:
        fig = plt.figure(figsize=(max(8, 2.2 * len(composites)), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(rows)
    avg = row_means(result)
    for i, row in enumerate(rows):
        means, stds = [], []
        for c in result["composites"]:
            values = result["results"][c][row]
            means.append(statistics.mean(values) if values else 0.0)
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        means.append(avg[row])
        stds.append(0.0)
        xs = [j + (i - len(rows) / 2 + 0.5) * width for j in range(len(composites))]
        ax.bar(
            xs, means, width, yerr=stds, label=row, capsize=2, color=plt.cm.tab20(i / max(1, len(rows) - 1))
        )
    ax.set_xticks(range(len(composites)), composites)
    ax.set_ylabel("exact match (%)")
    seeds = len(result["seeds"])
    ax.set_title(f"Composition study (skill world), trained rows: mean ± std over {seeds} seed(s)")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if own:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def write_report(result: dict[str, Any], out: Path, *, inputs: OutputInputs = ()) -> Path:
    """Write ``study.md``, ``study.json``, ``study.png`` and the self-contained ``study.html``
    (tables, bar chart, gate heatmap, token-level plot) into the folder ``out`` (atomically).

    ``out`` must not be, contain or lie inside any of ``inputs`` (the skill world).
    """
    record = {**result, "versions": versions()}
    table = format_table(result)
    with atomic_output_dir(out, inputs=inputs, what="--report") as tmp:
        (tmp / "study.json").write_text(json.dumps(record, indent=2) + "\n")
        header = (
            f"# Composition study\n\n{result['metric']}; seeds {result['seeds']}; "
            f"test examples per task: {result['limit'] or 'all'}; {result['seconds']} s.\n\n"
        )
        (tmp / "study.md").write_text(header + table + "\n")
        bar_chart(result, tmp / "study.png")
        from lorafuse.studies.report_html import study_html

        (tmp / "study.html").write_text(study_html(result))
    return out
