"""The one training loop every learned method shares (nanoGPT/torchtune style: no trainer).

Examples are ``{"prompt", "completion"}`` rows; the loss is the mean cross-entropy on completion
tokens only (prompt and padding labels are ``-100``). AdamW (β 0.9/0.95), linear warm-up then
cosine decay, gradient clipping, a seeded sampler; only the parameters passed in are updated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lorafuse._data import Encoded, collate


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    warmup: float = 0.1  # fraction of steps
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup · steps``, then cosine decay to 0."""
    warm = max(1, int(config.warmup * config.steps))
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, config.steps - warm)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_loop(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    data: Sequence[Encoded],
    config: TrainConfig,
    *,
    pad_id: int = 0,
    desc: str = "train",
    progress: bool = True,
    loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor] | None = None,
) -> list[float]:
    """Train ``params`` of ``model`` on ``data`` for ``config.steps`` steps; returns the losses.

    ``loss_fn(model, batch)`` replaces the default ``model(**batch).loss`` (batch = the collated
    ``input_ids``, ``attention_mask``, ``labels``): routers add a load-balancing term or a
    policy-gradient surrogate (RLOO) this way, without a second loop.
    """
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    bar = tqdm(range(config.steps), desc=desc, unit="step", disable=not progress, leave=False)
    for step in bar:
        if len(order) < config.batch_size:  # epoch-wise shuffling, seeded
            order += torch.randperm(len(data), generator=generator).tolist()
        batch = [data[i] for i in order[: config.batch_size]]
        del order[: config.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        collated = collate(batch, pad_id)
        loss = loss_fn(model, collated) if loss_fn is not None else model(**collated).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.clip)
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses
