"""Learned composition of existing LoRAs on a few examples: ``lorafuse.fuse(...)``.

Every method weights one bank of the given LoRAs (base and LoRAs frozen) and returns a
:class:`~lorafuse.fusion.artefact.Fusion`:

| method        | what is learned                                          | trained by            |
| ------------- | -------------------------------------------------------- | --------------------- |
| ``lora-flow`` | per-layer gates, per-token weights (LoRA-Flow)           | the shared loop       |
| ``cat``       | one softmax-normalised weight per LoRA per module (Soups)| the shared loop       |
| ``lorahub``   | one weight per LoRA in [-1.5, 1.5], + 0.05·mean|w|       | nevergrad, 40 evals   |
| ``average``   | nothing: ``w_i = 1/k``                                   | —                     |

``train_fresh_lora`` / ``fit_fresh_lora`` train a new PEFT LoRA on the same examples (the recycling
study's control; ``lorafuse train-lora`` on the command line).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lorafuse._data import Encoded, encode_rows
from lorafuse.adapters import LoRA, load_lora
from lorafuse.errors import LorafuseError
from lorafuse.fusion.artefact import Fusion, adapter_hashes
from lorafuse.fusion.cat_weights import CatWeights
from lorafuse.fusion.flow import flow_for
from lorafuse.fusion.gate import Granularity
from lorafuse.fusion.lorahub import LoraHubConfig, lorahub_search
from lorafuse.runtime import AttachedBank, attach, detach
from lorafuse.train.loop import TrainConfig, TrainResult, dev_loss, train

FUSION_METHODS = ("lora-flow", "cat", "lorahub", "average")

# LoRA-Flow's recipe (paper code): 5 epochs, AdamW β (0.9, 0.95), eps 1e-5, weight decay 0.1, cosine
# with 20 % warm-up, clip 1.0, lr 1e-3, batch 4.
FLOW_TRAIN = TrainConfig(epochs=5, batch_size=4, lr=1e-3, warmup=0.2, weight_decay=0.1, eps=1e-5)
# CAT: the same budget; scalars per module need a larger step (the recycling study uses 5e-2).
CAT_TRAIN = replace(FLOW_TRAIN, lr=1e-2, weight_decay=0.0)


@dataclass(frozen=True)
class FuseSettings:
    """Settings of :func:`fuse`; the defaults follow each method's paper (see the module table)."""

    method: Literal["lora-flow", "cat", "lorahub", "average"] = "lora-flow"
    train: TrainConfig | None = None  # default FLOW_TRAIN / CAT_TRAIN
    granularity: Granularity = "layer"
    temperature: float = 1.0
    bias_in_softmax: bool = False
    start: int | None = -1  # gate starts on this LoRA (the last, the task LoRA); None = uniform
    lorahub: LoraHubConfig = field(default_factory=LoraHubConfig)
    seed: int = 0
    chat: bool = False  # {"prompt", "completion"} rows as a user and an assistant turn (chat template)

    def train_config(self) -> TrainConfig:
        base = self.train or (CAT_TRAIN if self.method == "cat" else FLOW_TRAIN)
        return replace(base, seed=self.seed)


def _frozen(model: nn.Module) -> dict[str, bool]:
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    return flags


def _restore(model: nn.Module, flags: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))


def _summary(result: TrainResult, seconds: float) -> dict[str, Any]:
    return {
        "steps": len(result.losses),
        "final_train_loss": round(sum(result.losses[-10:]) / max(1, len(result.losses[-10:])), 5),
        "dev_losses": result.dev,
        "best_step": result.best_step,
        "best_dev_loss": result.best_dev_loss,
        "resumed_from": result.resumed_from,
        "seconds": round(seconds, 2),
    }


def fit_on_bank(
    handle: AttachedBank,
    train_data: Sequence[Encoded],
    dev_data: Sequence[Encoded] | None,
    settings: FuseSettings,
    *,
    pad_id: int,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> Fusion:
    """Learn ``settings.method``'s weights for the bank ``handle`` (the model's parameters stay frozen)."""
    model, started = handle.model, time.perf_counter()
    if settings.method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion method {settings.method!r}; choose one of {FUSION_METHODS}")
    flags = _frozen(model)
    try:
        if settings.method == "average":
            weights = torch.full((handle.k,), 1.0 / handle.k)
            handle.set_weights(weights)
            return Fusion("static", list(handle.names), {"weights": weights}, info={"fusion": "average"})
        if settings.method == "lorahub":

            def loss_of(w: torch.Tensor) -> float:
                with handle.weights(w):
                    return dev_loss(model, train_data, pad_id)

            cfg = replace(settings.lorahub, seed=settings.seed)
            weights, history = lorahub_search(loss_of, handle.k, cfg, progress=progress)
            handle.set_weights(weights)
            info = {
                "fusion": "lorahub",
                "config": asdict(cfg),
                "objective": history,
                "seconds": round(time.perf_counter() - started, 2),
            }
            return Fusion("static", list(handle.names), {"weights": weights}, info=info)
        config = settings.train_config()
        if settings.method == "cat":
            source: nn.Module = CatWeights(list(handle.banks), handle.k)
            source.to(next(iter(handle.banks.values())).A.device)
            handle.set_source(source)  # type: ignore[arg-type]
        else:
            source = flow_for(
                handle,
                granularity=settings.granularity,
                temperature=settings.temperature,
                bias_in_softmax=settings.bias_in_softmax,
                start=settings.start,
            )
        result = train(
            model,
            source.parameters(),
            train_data,
            config,
            pad_id=pad_id,
            dev_data=dev_data,
            checkpoint_dir=checkpoint_dir,
            desc=settings.method,
            progress=progress,
        )
        info = {
            "fusion": settings.method,
            "train": asdict(config),
            "result": _summary(result, time.perf_counter() - started),
        }
        if settings.method == "cat":
            assert isinstance(source, CatWeights)
            return Fusion(
                "cat-weights",
                list(handle.names),
                {"logits": source.logits.detach().cpu()},
                module_paths=source.module_paths,
                info=info,
            )
        return Fusion(
            "lora-flow",
            list(handle.names),
            {
                "gate.weight": source.gates.weight.detach().cpu(),
                "gate.bias": source.gates.bias.detach().cpu(),
            },
            gate=source.config,
            info=info,
        )
    finally:
        _restore(model, flags)


def fuse(
    model: nn.Module,
    tokenizer: Any,
    loras: Mapping[str, LoRA | str | Path],
    train_rows: Sequence[Mapping[str, str]],
    dev_rows: Sequence[Mapping[str, str]] | None = None,
    settings: FuseSettings | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    keep_attached: bool = False,
    progress: bool = True,
    **options: Any,
) -> Fusion:
    """Learn how to combine ``loras`` (``{name: LoRA or PEFT folder}``, in bank order) for a task.

    ``train_rows``/``dev_rows`` are ``{"messages"}`` rows (the tokenizer's chat template, loss on
    assistant turns only), ``{"prompt", "completion"}`` rows (loss on the completion; rendered as
    a chat with ``chat=True``) or ``{"text"}`` rows (:func:`lorafuse._data.encode_rows`).
    ``options`` override :class:`FuseSettings` fields (``method="cat"``, ...).
    The LoRA order matters for LoRA-Flow's start: the gate starts on the last LoRA (put the task
    LoRA last, as in the paper). Returns the fusion; the model is left as it was unless
    ``keep_attached``.
    """
    settings = replace(settings or FuseSettings(), **options)
    loaded: dict[str, LoRA] = {}
    paths: dict[str, str] = {}
    hashes: dict[str, dict[str, str]] = {}
    for name, item in loras.items():
        if isinstance(item, LoRA):
            loaded[name] = item
            source = item.metadata.get("source")
            if source and Path(source).is_dir():
                paths[name], hashes[name] = str(Path(source).resolve()), adapter_hashes(Path(source))
        else:
            loaded[name] = load_lora(item)
            paths[name], hashes[name] = str(Path(item).resolve()), adapter_hashes(Path(item))
    train_data = encode_rows(tokenizer, train_rows, chat=settings.chat, source="train")
    dev_data = encode_rows(tokenizer, dev_rows, chat=settings.chat, source="dev") if dev_rows else None
    handle = attach(model, loaded)
    try:
        fusion = fit_on_bank(
            handle,
            train_data,
            dev_data,
            settings,
            pad_id=_pad_id(tokenizer),
            checkpoint_dir=checkpoint_dir,
            progress=progress,
        )
    finally:
        if not keep_attached:
            detach(model)
    fusion.lora_paths, fusion.lora_hashes = paths, hashes
    fusion.info.update(
        {
            "examples": {"train": len(train_data), "dev": len(dev_data or [])},
            "seed": settings.seed,
            "chat": settings.chat or any("messages" in row for row in train_rows),
        }
    )
    base = getattr(getattr(model, "config", None), "_name_or_path", None)
    if base:
        fusion.info["base_model"] = base
    return fusion


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The recycling study's fresh-LoRA recipe: LoRA-Flow's schedule with lr 4e-3, no weight decay, eps 1e-8.
FRESH_TRAIN = replace(FLOW_TRAIN, lr=4e-3, weight_decay=0.0, eps=1e-8)


def fit_fresh_lora(
    model: nn.Module,
    train_data: Sequence[Encoded],
    dev_data: Sequence[Encoded] | None,
    config: TrainConfig,
    *,
    pad_id: int,
    rank: int = 16,
    alpha: float = 32,
    target_modules: str | Sequence[str] = LLAMA_TARGETS,
    copy_model: bool = True,
    progress: bool = True,
) -> tuple[nn.Module, TrainResult]:
    """A new PEFT LoRA trained on ``train_data`` and its training record (losses, best dev step).

    ``target_modules`` are module names as PEFT takes them (a list, or ``"all-linear"``: every
    linear layer but the output head). ``copy_model=False`` wraps ``model`` itself (no second
    copy of the weights in memory; the caller owns the result). A target list that matches no
    module of the model is one :class:`LorafuseError` naming the list and some module names.
    """
    from peft import LoraConfig, get_peft_model

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    torch.manual_seed(config.seed)
    lora_config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    try:
        peft_model = get_peft_model(copy.deepcopy(model) if copy_model else model, lora_config)
    except ValueError as exc:  # PEFT: "Target modules {...} not found in the base model"
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise LorafuseError(
            f"target modules {targets!r} cannot be adapted in {type(model).__name__} "
            f"({str(exc).splitlines()[0][:200]}); its linear layers are named {linear[:12]}"
        ) from None
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    result = train(
        peft_model,
        trainable,
        train_data,
        config,
        pad_id=pad_id,
        dev_data=dev_data,
        desc="fresh lora",
        progress=progress,
    )
    return peft_model.eval(), result


def train_fresh_lora(
    model: nn.Module,
    train_data: Sequence[Encoded],
    dev_data: Sequence[Encoded] | None,
    config: TrainConfig,
    *,
    pad_id: int,
    rank: int = 16,
    alpha: int = 32,
    target_modules: str | Sequence[str] = LLAMA_TARGETS,
    progress: bool = True,
) -> nn.Module:
    """A new PEFT LoRA trained on the same few examples (a copy of ``model``; the original is untouched)."""
    return fit_fresh_lora(
        model,
        train_data,
        dev_data,
        config,
        pad_id=pad_id,
        rank=rank,
        alpha=alpha,
        target_modules=target_modules,
        progress=progress,
    )[0]
