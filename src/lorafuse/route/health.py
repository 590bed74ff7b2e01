"""Routing health: effective number of experts and the top expert's share, per layer; a PNG plot.

For each layer, ``p̄`` is the mean over valid tokens of the routing weights actually applied
(``(n,)``, sums to 1): ``effective experts = exp(H(p̄))`` (1 = collapse to one expert, n = all
used equally) and ``top share = max_i p̄_i``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from lorafuse.route.functional import effective_experts, top_share


class RoutingStats:
    """Accumulates ``Σ_tokens w`` and the token count per layer; call it as a stats hook."""

    def __init__(self) -> None:
        self.sums: dict[int, Tensor] = {}
        self.counts: dict[int, float] = {}

    def __call__(self, layer: int, weights: Tensor, mask: Tensor) -> None:
        w = weights.float() / weights.float().sum(-1, keepdim=True).clamp_min(1e-12)  # (B, T, n)
        m = mask.float()  # (B, T)
        total = (w * m[..., None]).reshape(-1, w.shape[-1]).sum(0)  # (n,)
        self.sums[layer] = self.sums.get(layer, torch.zeros_like(total)) + total.cpu()
        self.counts[layer] = self.counts.get(layer, 0.0) + float(m.sum())

    def mean_distribution(self) -> dict[int, Tensor]:
        return {layer: self.sums[layer] / max(self.counts[layer], 1e-12) for layer in sorted(self.sums)}

    def summary(self) -> dict[str, list[float]]:
        """``{"effective_experts": [per layer], "top_share": [per layer], "usage": [[per expert]]}``."""
        means = self.mean_distribution()
        return {
            "effective_experts": [round(float(effective_experts(p)), 4) for p in means.values()],
            "top_share": [round(float(top_share(p)), 4) for p in means.values()],
            "usage": [[round(float(v), 4) for v in p] for p in means.values()],
        }


def plot_health(
    curves: dict[str, list[list[float]]], path: str | os.PathLike[str], *, n_experts: int | None = None
) -> Path:
    """Plot effective experts per layer (mean ± std over runs) for each method to a PNG (atomic).

    ``curves`` maps a method name to its runs, each a list of per-layer effective-expert counts.
    """
    from lorafuse._extras import require

    matplotlib = require("matplotlib", "study", "the routing health plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, runs in curves.items():
        values = torch.tensor(runs, dtype=torch.float64)  # (runs, L)
        mean = values.mean(0)
        std = values.std(0, unbiased=False) if len(runs) > 1 else torch.zeros_like(mean)
        layers = list(range(values.shape[1]))
        ax.errorbar(layers, mean.tolist(), yerr=std.tolist(), marker="o", capsize=3, label=name)
        ax.set_xticks(layers)
    if n_experts:
        ax.axhline(n_experts, color="grey", linestyle=":", linewidth=1, label=f"n = {n_experts}")
    ax.set_xlabel("layer")
    ax.set_ylabel("effective experts  exp(H(mean routing))")
    ax.set_title("Routing health")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out
