"""BitDelta's scale distillation (Liu et al., 2024, arXiv 2402.10193, §3.2).

With the signs fixed, the per-matrix scales ``α`` of a ``bitdelta`` delta are trained so that
the compressed model's logits match the fine-tuned model's on calibration text:
``min_α E ‖z_ft(x) − z_α(x)‖²`` (mean over valid positions and the vocabulary), AdamW; the paper
uses 200 steps, batch 4, 128 tokens, learning rate 1e-4. The student is the base model with the
non-linear deltas applied; each sign matrix enters through a forward hook
``y = W0 x + α · sign(ΔW) x``, so nothing but the scales has a gradient. Works on any
``nn.Module`` (no transformers import); the signs are held in fp32, ``out·in`` floats per
layer, which is fine at skill-world sizes, not for a 7B model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lorafuse.compress.format import CompressedDelta
from lorafuse.compress.types import SignDelta
from lorafuse.errors import CompressError


def _batch(seqs: list[Tensor]) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)  # (B, T), right-padded
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def distill_scales(
    student: nn.Module,
    teacher: nn.Module,
    delta: CompressedDelta,
    sequences: Sequence[Tensor],
    *,
    steps: int = 200,
    batch_size: int = 4,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
) -> CompressedDelta:
    """A copy of ``delta`` with distilled scales; ``student`` and ``teacher`` are left as they were."""
    if not all(isinstance(m, SignDelta) for m in delta.modules.values()):
        raise CompressError(f"scale distillation applies to bitdelta deltas, not {delta.method}")
    modules = dict(student.named_modules())
    alphas = {p: nn.Parameter(torch.tensor(float(m.alpha))) for p, m in delta.modules.items()}
    signs = {p: m.signs.float() * 2 - 1 for p, m in delta.modules.items()}  # (out, in) ±1
    hooks = []
    for path in delta.modules:
        if path not in modules:
            raise CompressError(f"the student model has no module {path}")

        def hook(mod: nn.Module, args: tuple, out: Tensor, path: str = path) -> Tensor:
            return out + alphas[path] * F.linear(args[0], signs[path].to(args[0].dtype))

        hooks.append(modules[path].register_forward_hook(hook))
    frozen = [(p, p.requires_grad) for p in student.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(list(alphas.values()), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []

    def loss_on(ids: Tensor, mask: Tensor) -> Tensor:
        with torch.no_grad():
            target = teacher(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
        logits = student(input_ids=ids, attention_mask=mask).logits.float()
        valid = mask[..., None].float()
        return (((logits - target) ** 2) * valid).sum() / (valid.sum() * logits.shape[-1])

    held = _batch(list(sequences[:16]))  # a fixed batch to report the loss before and after
    try:
        with torch.no_grad():
            before = loss_on(*held).item()
        for _ in tqdm(range(steps), desc="distill scales", unit="step", disable=not progress, leave=False):
            pick = torch.randint(0, len(sequences), (batch_size,), generator=generator).tolist()
            loss = loss_on(*_batch([sequences[i] for i in pick]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        with torch.no_grad():
            after = loss_on(*held).item()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    new = {p: SignDelta(m.signs, float(alphas[p].detach())) for p, m in delta.modules.items()}
    info = dict(delta.info)
    info["scale_distillation"] = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "logit_mse_before": before,
        "logit_mse_after": after,
    }
    return replace(delta, modules=new, info=info)
