"""The composition study as one self-contained HTML page: tables and figures, nothing fetched.

``study.html`` holds the exact-match table (and, for the faithful family, the final-answer table),
the learning rate / batch chosen per task, the bar chart with error bars, the gate heatmap (mean
LoRA-Flow weight per layer and LoRA, per composite) and the token-level plot (the language LoRA's
weight on answer tokens that are language words vs. digits and operators, per layer). Figures
are PNGs inlined as ``data:`` URIs; a few lines of script count the images that loaded
(``data-images-loaded`` on ``<body>``), which the report's browser test reads.
"""

from __future__ import annotations

import base64
import html
import io
import statistics
from collections.abc import Callable
from typing import Any

from lorafuse.studies.report import bar_chart, cell, row_means

SCRIPT = """
<script>
function countImages() {
  const images = Array.from(document.images);
  const loaded = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = String(loaded);
  document.body.dataset.images = String(images.length);
}
window.addEventListener("load", countImages);
</script>
"""
STYLE = """
<style>
body { font-family: sans-serif; margin: 2em; max-width: 1200px; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 1em 0; }
</style>
"""


def _png(draw: Callable[[Any], None], size: tuple[float, float]) -> str:
    """A figure drawn by ``draw(fig)`` as a ``data:image/png;base64,...`` URI."""
    from lorafuse._extras import require

    matplotlib = require("matplotlib", "study", "the study's HTML page")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size)
    draw(fig)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _table(head: list[str], rows: list[list[str]], caption: str) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><caption>{html.escape(caption)}</caption><tr>{cells}</tr>{body}</table>"


def _score_table(result: dict[str, Any], values: Callable[[str, str], list[float]], caption: str) -> str:
    composites, seeded = result["composites"], set(result["seeded_rows"])
    rows = []
    for row in result["rows"]:
        per = [values(c, row) for c in composites]
        means = [statistics.mean(v) for v in per if v]
        rows.append(
            [row, *(cell(v, row in seeded) for v in per), f"{statistics.mean(means):.1f}" if means else "—"]
        )
    return _table(["method", *composites, "avg"], rows, caption)


def _gate_heatmap(result: dict[str, Any]) -> Callable[[Any], None]:
    composites = [c for c in result["composites"] if result["details"][c].get("flow_gate_mean")]

    def draw(fig: Any) -> None:
        for i, composite in enumerate(composites):
            gates = result["details"][composite]["flow_gate_mean"]
            first = gates[min(gates, key=str)]  # (layers, k) of the first seed
            ax = fig.add_subplot(1, len(composites), i + 1)
            image = ax.imshow(first, aspect="auto", cmap="viridis")
            ax.set_title(composite, fontsize=8)
            ax.set_xticks(range(len(first[0])), result["details"][composite]["loras"], fontsize=7)
            ax.set_ylabel("layer")
            fig.colorbar(image, ax=ax, fraction=0.05)

    return draw


def _token_plot(result: dict[str, Any]) -> Callable[[Any], None]:
    composites = [c for c in result["composites"] if result["details"][c].get("token_gates")]

    def draw(fig: Any) -> None:
        for i, composite in enumerate(composites):
            means = result["details"][composite]["token_gates"]["mean_weights"]
            ax = fig.add_subplot(1, len(composites), i + 1)
            for kind, style in (("language words", "o-"), ("digits and operators", "s--")):
                if means.get(kind):
                    ax.plot([w[0] for w in means[kind]], style, label=f"language LoRA, {kind}")
                    ax.plot([w[1] for w in means[kind]], style, alpha=0.5, label=f"task LoRA, {kind}")
            ax.set_title(composite, fontsize=8)
            ax.set_xlabel("layer")
            ax.set_ylabel("mean gate weight")
            if i == 0:
                ax.legend(fontsize=6)

    return draw


def study_html(result: dict[str, Any]) -> str:
    """The whole page for a :func:`~lorafuse.studies.composition.composition_study` result."""
    details = result["details"]
    parts = [
        f"<h1>Composition study</h1><p>{html.escape(result['metric'])}; seeds {result['seeds']}; "
        f"test examples per task: {result['limit'] or 'all'}; {result['seconds']} s.</p>",
        _score_table(result, lambda c, r: result["results"][c][r], "exact match (%), mean ± std over seeds"),
    ]
    finals = [c for c in result["composites"] if "final_answer_match" in details[c]]
    if finals:
        parts.append(
            _score_table(
                result,
                lambda c, r: details[c].get("final_answer_match", {}).get(r, []),
                "final answer alone (%), MGSM's metric (faithful family only)",
            )
        )
    chosen = [
        [
            c,
            row,
            f"{s['lr']:g}",
            str(s["batch_size"]),
            ", ".join(f"{k}: {v}" for k, v in s["dev_loss"].items()),
        ]
        for c in result["composites"]
        for row, s in details[c].get("settings", {}).items()
    ]
    if chosen:
        parts.append(
            _table(["composite", "row", "lr", "batch", "dev loss"], chosen, "settings chosen on the dev set")
        )
    composites = [*result["composites"], "avg"]
    width = max(8.0, 2.2 * len(composites))
    parts.append(f'<img alt="bar chart" src="{_png(lambda fig: _bars(result, fig), (width, 4.5))}">')
    n = max(1, len(result["composites"]))
    if any(details[c].get("flow_gate_mean") for c in result["composites"]):
        parts.append(f'<img alt="gate heatmap" src="{_png(_gate_heatmap(result), (3 * n, 3))}">')
    if any(details[c].get("token_gates") for c in result["composites"]):
        parts.append(f'<img alt="token-level gates" src="{_png(_token_plot(result), (3.5 * n, 3.2))}">')
    average = row_means(result)
    parts.append(
        "<p>Row averages: " + html.escape(", ".join(f"{r} {v:.1f}" for r, v in average.items())) + "</p>"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>lorafuse composition study</title>"
        + STYLE
        + "</head><body>"
        + "\n".join(parts)
        + SCRIPT
        + "</body></html>\n"
    )


def _bars(result: dict[str, Any], fig: Any) -> None:
    """The report's bar chart drawn into ``fig`` (the PNG of ``study.png``)."""
    bar_chart(result, None, fig=fig)
