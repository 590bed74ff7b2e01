"""Train a mixture of LoRA experts with the shared loop (:func:`lorafuse.train.loop.train_loop`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorafuse._data import Encoded
from lorafuse.route.mixture import Mixture, MixtureConfig
from lorafuse.train.loop import TrainConfig, train_loop


def train_mixture(
    model: nn.Module,
    data: Sequence[Encoded],
    config: MixtureConfig,
    train: TrainConfig,
    *,
    pad_id: int = 0,
    base_model: str | None = None,
    progress: bool = True,
) -> tuple[Mixture, list[float]]:
    """Attach ``config.experts`` fresh experts and a ``config.router`` router to ``model``; train them.

    The base stays frozen (only the experts' factors and the router are passed to the loop).
    Returns the trained mixture (still attached, frozen) and the per-step language losses.
    """
    model.requires_grad_(False)
    torch.manual_seed(config.seed)
    mixture = Mixture.create(model, config, base_model)
    generator = torch.Generator().manual_seed(config.seed + 1)
    losses = train_loop(
        model,
        mixture.parameters(),
        data,
        train,
        pad_id=pad_id,
        desc=f"route {config.router}",
        progress=progress,
        loss_fn=mixture.loss_fn(generator),
    )
    mixture.freeze()
    return mixture, losses
