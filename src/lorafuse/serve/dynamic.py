"""The rows of a serving batch that use learned fusions: each fusion's own weight rule, grouped.

A row using a LoRA-Flow fusion has its fusion's k LoRAs as its parts (weight 1); a row using
learned CAT weights likewise. The weights come from the fusion's weight rule
(:meth:`lorafuse.fusion.artefact.Fusion.weight_rule`, the same rule ``Fusion.attach`` installs),
applied to that row's hidden states by :class:`~lorafuse.runtime.LayerInputSource` and spread
over the row's parts by the plan::

    c[b, t, j] = w[b, t, owner[b, j]]          (owner = which of the k LoRAs rank j belongs to)

Other rows keep the plan's static coefficients. No gate maths here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorafuse.fusion.artefact import Fusion
from lorafuse.runtime import LayerInputSource


def fusion_rows(model: nn.Module, groups: Sequence[tuple[Fusion, Sequence[int]]]) -> LayerInputSource:
    """A source weighting each group of batch rows with its fusion's rule (hooks installed, idle
    until the pool uses the plan it is given to)."""
    device = next(model.parameters()).device
    rules = []
    for fusion, rows in groups:
        rule = fusion.weight_rule(device)
        if rule is None:
            raise ValueError(f"fusion method {fusion.method!r} has no learned weight rule")
        rules.append((rule, torch.tensor(list(rows), dtype=torch.long)))
    return LayerInputSource(model, rules, enabled=False)
