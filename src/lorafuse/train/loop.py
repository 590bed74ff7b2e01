"""The one training loop every learned method shares (nanoGPT/torchtune style: no trainer).

Examples are ``{"prompt", "completion"}`` rows encoded as ``(input ids, labels)``; the default loss
is the mean cross-entropy on completion tokens only (prompt and padding labels are ``-100``).
AdamW, linear warm-up then cosine decay, gradient clipping, a seeded epoch-wise sampler; only the
parameters passed in are updated. Optionally: a dev set scored every ``eval_every`` steps, the
best parameters kept (checkpoint chosen on dev loss), and a checkpoint folder to resume from
after an interruption (safetensors + JSON, written atomically; never pickle).

Scale-out with ``accelerate``: under ``accelerate launch --num_processes N`` every process draws
the same seeded global batches and takes every N-th example of each; the loss of a process is
weighted by its share of the batch's completion tokens and the gradients are summed across
processes, so N processes compute exactly the full-batch gradient of one process (up to float
summation order) and every process takes the same optimizer step.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from tqdm.auto import tqdm

from lorafuse._checks import NonNegativeInt, StrictFiniteFloat, finite_or_none, parse_model
from lorafuse._data import Encoded, collate
from lorafuse._io import read_json_file, read_safetensors, write_safetensors
from lorafuse.errors import CheckpointError, LorafuseError

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 0  # optimizer steps; 0 = ``epochs`` passes over the data
    batch_size: int = 8
    lr: float = 1e-3
    warmup: float = 0.1  # fraction of steps
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    epochs: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    eval_every: int = 0  # steps between dev evaluations; 0 = once per epoch
    save_every: int = 0  # steps between checkpoints; 0 = at every dev evaluation
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward (memory for time)

    def total_steps(self, num_examples: int) -> int:
        if self.steps > 0:
            return self.steps
        if self.epochs <= 0:
            raise ValueError("TrainConfig needs steps > 0 or epochs > 0")
        return max(1, math.ceil(self.epochs * num_examples / self.batch_size))


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # training loss per step (whole batch)
    dev: list[tuple[int, float]] = field(default_factory=list)  # (step, dev loss)
    best_step: int | None = None
    best_dev_loss: float | None = None
    resumed_from: int | None = None


def lr_at(step: int, config: TrainConfig, total: int | None = None) -> float:
    """Linear warm-up to ``lr`` over ``warmup · steps``, then cosine decay to 0."""
    total = total or config.steps
    warm = max(1, int(config.warmup * total))
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def process_state(cpu: bool | None = None):  # type: ignore[no-untyped-def]
    """accelerate's process state (rank, world size, device). On a machine without CUDA it must be
    created with ``cpu=True`` to join a multi-process CPU run (torchrun); doing it here first, before
    anything else asks, keeps every caller in the same process group."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available() if cpu is None else cpu)


def default_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy on the labelled (completion) tokens: the HF model's own ``loss``."""
    return model(**batch).loss


def label_count(batch: dict[str, Tensor]) -> int:
    """Completion tokens that carry a loss after the causal shift."""
    return int((batch["labels"][:, 1:] != -100).sum())


def batch_schedule(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The global batches of every step: seeded permutations, one per epoch, consumed in order."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    schedule = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=generator).tolist()
        schedule.append(order[:batch_size])
        del order[:batch_size]
    return schedule


@torch.no_grad()
def dev_loss(
    model: nn.Module,
    data: Sequence[Encoded],
    pad_id: int,
    loss_fn: LossFn = default_loss,
    batch_size: int = 64,
) -> float:
    """Token-weighted mean loss over ``data`` (every process computes it whole: dev sets are small)."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in collate(data[start : start + batch_size], pad_id).items()}
        n = label_count(batch)
        total += float(loss_fn(model, batch)) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


class _Checkpoint:
    """Parameters, AdamW state and the best parameters so far, in safetensors + JSON."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any]) -> None:
        self.folder = folder
        self.fingerprint = fingerprint

    def save(
        self,
        step: int,
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        best: list[Tensor] | None,
        result: TrainResult,
    ) -> None:
        tensors = {f"param.{i}": p.detach() for i, p in enumerate(params)}
        for i, p in enumerate(params):
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"adam.{i}.{key}"] = torch.as_tensor(value).detach()
        for i, b in enumerate(best or []):
            tensors[f"best.{i}"] = b
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".state.{os.getpid()}.tmp"
        write_safetensors(tensors, tmp)
        os.replace(tmp, self.folder / "state.safetensors")
        meta = {"fingerprint": self.fingerprint, "step": step, "result": finite_or_none(asdict(result))}
        tmp_json = self.folder / f".state.{os.getpid()}.json.tmp"
        tmp_json.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp_json, self.folder / "state.json")

    def load(
        self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer
    ) -> tuple[int, list[Tensor] | None, TrainResult] | None:
        meta_path, state_path = self.folder / "state.json", self.folder / "state.safetensors"
        if not meta_path.is_file() or not state_path.is_file():
            return None
        raw = read_json_file(meta_path, CheckpointError, what="checkpoint description")
        if not isinstance(raw, dict) or raw.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"{self.folder}: this checkpoint belongs to another run (different data, settings or "
                "parameters); use another checkpoint folder or delete it to start afresh"
            )
        meta = parse_model(_CheckpointMeta, raw, str(meta_path), error=CheckpointError)
        try:
            tensors = read_safetensors(state_path, require_finite=True)
        except LorafuseError as exc:
            raise CheckpointError(str(exc)) from None
        for i, p in enumerate(params):
            for prefix in ("param", "best") if "best.0" in tensors else ("param",):
                got = tuple(tensors[f"{prefix}.{i}"].shape) if f"{prefix}.{i}" in tensors else "missing"
                if got != tuple(p.shape):
                    raise CheckpointError(
                        f"{state_path}: {prefix}.{i} is {got}, the parameter is {tuple(p.shape)}"
                    )
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"param.{i}"])
                state = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"adam.{i}.")}
                if state:
                    optimizer.state[p] = {k: v.to(p.device) for k, v in state.items()}
        best = [tensors[f"best.{i}"] for i in range(len(params))] if "best.0" in tensors else None
        result = TrainResult(**meta.result.model_dump())
        result.dev = [tuple(x) for x in result.dev]  # type: ignore[misc]
        return meta.step, best, result


class _ResultRecord(BaseModel):
    """``state.json``'s ``result`` (the fields of :class:`TrainResult`; diverged losses are null)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    losses: list[StrictFiniteFloat | None] = []
    dev: list[tuple[NonNegativeInt, StrictFiniteFloat | None]] = []
    best_step: NonNegativeInt | None = None
    best_dev_loss: StrictFiniteFloat | None = None
    resumed_from: NonNegativeInt | None = None


class _CheckpointMeta(BaseModel):
    """``state.json`` of a checkpoint folder."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    fingerprint: Any
    step: NonNegativeInt
    result: _ResultRecord


@contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """HF gradient checkpointing of ``model``'s decoder layers while training (non-reentrant).

    Activations inside each decoder layer are recomputed in the backward pass instead of kept:
    memory of a frozen base's activations drops from all layers' to about one layer's, at the
    cost of a second forward. Forward pre-hooks (LoRA-Flow gates, routers) run again in the
    recomputation and give the same weights, so gradients are unchanged.
    """
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LorafuseError(f"{type(model).__name__} does not support gradient checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:  # transformers 5 renamed the switch-off (the old name warns)
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()


def train(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    data: Sequence[Encoded],
    config: TrainConfig,
    *,
    pad_id: int = 0,
    dev_data: Sequence[Encoded] | None = None,
    loss_fn: LossFn = default_loss,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    desc: str = "train",
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``params`` of ``model`` on ``data``; with ``dev_data``, end on the best dev-loss parameters.

    Resumes from ``checkpoint_dir`` when it holds a checkpoint of the same run. ``on_step(step, loss)``
    is called after every optimizer step (progress reporting; tests use it to interrupt a run).
    """
    from accelerate import Accelerator

    process_state(cpu=_device_of(model).type == "cpu")
    accelerator = Accelerator(cpu=_device_of(model).type == "cpu")
    world, rank = accelerator.num_processes, accelerator.process_index
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    if config.batch_size % world:
        raise ValueError(f"batch size {config.batch_size} must be divisible by the {world} processes")
    steps = config.total_steps(len(data))
    per_epoch = max(1, math.ceil(len(data) / config.batch_size))
    eval_every = config.eval_every or per_epoch
    save_every = config.save_every or eval_every
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    schedule = batch_schedule(len(data), config.batch_size, steps, config.seed)
    device = params[0].device
    result, best, start = TrainResult(), None, 0
    checkpoint = None
    if checkpoint_dir is not None:
        fingerprint = {
            "config": json.loads(json.dumps(asdict(config))),
            "examples": len(data),
            "dev_examples": len(dev_data or ()),
            "params": [list(p.shape) for p in params],
        }
        checkpoint = _Checkpoint(Path(checkpoint_dir), fingerprint)
        loaded = checkpoint.load(params, optimizer)
        if loaded is not None:
            start, best, result = loaded
            result.resumed_from = start
    model.train()
    bar = tqdm(
        range(start, steps),
        desc=desc,
        unit="step",
        disable=not progress or not accelerator.is_main_process,
        leave=False,
        initial=start,
        total=steps,
    )
    with gradient_checkpointing(model, config.gradient_checkpointing):
        for step in bar:
            global_batch = [data[i] for i in schedule[step]]
            batch = {k: v.to(device) for k, v in collate(global_batch[rank::world], pad_id).items()}
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config, steps)
            loss = loss_fn(model, batch)
            if world > 1:  # weight by this process's share of the batch's tokens, sum gradients
                local = torch.tensor(float(label_count(batch)), device=device)
                share = local / accelerator.reduce(local.clone(), reduction="sum")
                loss = loss * share
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad = accelerator.reduce(p.grad, reduction="sum")
                loss = accelerator.reduce(loss.detach(), reduction="sum")
            torch.nn.utils.clip_grad_norm_(params, config.clip)
            optimizer.step()
            loss = loss.detach()
            result.losses.append(float(loss))
            if step % 20 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
            done = step + 1
            if dev_data and (done % eval_every == 0 or done == steps):
                score = dev_loss(model, dev_data, pad_id, loss_fn)
                result.dev.append((done, score))
                if result.best_dev_loss is None or score < result.best_dev_loss:
                    result.best_dev_loss, result.best_step = score, done
                    best = [p.detach().clone() for p in params]
                bar.set_postfix(loss=f"{float(loss):.3f}", dev=f"{score:.3f}")
            if checkpoint is not None and (done % save_every == 0 or done == steps):
                if accelerator.is_main_process:
                    checkpoint.save(done, params, optimizer, best, result)
                accelerator.wait_for_everyone()
            if on_step is not None:
                on_step(done, float(loss))
    if best is not None:
        with torch.no_grad():
            for p, b in zip(params, best, strict=True):
                p.copy_(b.to(p.device))
    model.eval()
    return result


def train_loop(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    data: Sequence[Encoded],
    config: TrainConfig,
    *,
    pad_id: int = 0,
    desc: str = "train",
    progress: bool = True,
    loss_fn: LossFn | None = None,
) -> list[float]:
    """:func:`train` without a dev set or checkpoints; returns the training losses.

    ``loss_fn(model, batch)`` replaces the default ``model(**batch).loss`` (batch = the collated
    ``input_ids``, ``attention_mask``, ``labels``): routers add a load-balancing term or a
    policy-gradient surrogate (RLOO) this way, without a second loop.
    """
    return train(
        model,
        params,
        data,
        config,
        pad_id=pad_id,
        desc=desc,
        progress=progress,
        loss_fn=loss_fn or default_loss,
    ).losses
