"""Learned composition of existing LoRAs on a few examples: ``lorafuse.fuse(...)``.

Every method weights one bank of the given LoRAs (base and LoRAs frozen) and returns a
:class:`~lorafuse.fusion.artefact.Fusion`; the methods (``lora-flow``, ``cat-weights``,
``lorahub``, ``average``) are the entries of :data:`~lorafuse.fusion.methods.FUSION_METHODS`,
each owning its settings and its fit.

``train_fresh_lora`` / ``fit_fresh_lora`` train a new PEFT LoRA on the same examples (the recycling
study's control; ``lorafuse train-lora`` on the command line).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lorafuse._data import Encoded, encode_rows
from lorafuse._registry import FrozenParams
from lorafuse.adapters import LoRA, load_lora
from lorafuse.errors import LorafuseError
from lorafuse.fusion.artefact import Fusion, adapter_hashes
from lorafuse.fusion.gate import Granularity
from lorafuse.fusion.lorahub import LoraHubConfig
from lorafuse.fusion.methods import CAT_TRAIN, FLOW_TRAIN, FUSION_METHODS, FitRun, FusionMethod
from lorafuse.runtime import AttachedBank, attach, detach
from lorafuse.train.loop import TrainConfig, TrainResult, train

__all__ = [
    "CAT_TRAIN",
    "FLOW_TRAIN",
    "FRESH_TRAIN",
    "FUSION_METHODS",
    "FuseSettings",
    "fit_fresh_lora",
    "fit_on_bank",
    "fuse",
    "train_fresh_lora",
]


@dataclass(frozen=True)
class FuseSettings:
    """Settings of :func:`fuse`; the defaults follow each method's paper (:data:`FUSION_METHODS`).

    The gate fields (``granularity``, ``temperature``, ``bias_in_softmax``, ``start``) are
    LoRA-Flow's, ``lorahub`` is LoraHub's; :meth:`method_params` validates the chosen method's.
    """

    method: Literal["lora-flow", "cat-weights", "cat", "lorahub", "average"] = "lora-flow"
    train: TrainConfig | None = None  # default: the method's (FLOW_TRAIN / CAT_TRAIN)
    granularity: Granularity = "layer"
    temperature: float = 1.0
    bias_in_softmax: bool = False
    start: int | None = -1  # gate starts on this LoRA (the last, the task LoRA); None = uniform
    lorahub: LoraHubConfig = field(default_factory=LoraHubConfig)
    seed: int = 0
    chat: bool = False  # {"prompt", "completion"} rows as a user and an assistant turn (chat template)

    @property
    def entry(self) -> FusionMethod:
        """The registered method (``cat`` resolves to ``cat-weights``)."""
        return FUSION_METHODS[self.method]

    def train_config(self) -> TrainConfig:
        base = self.train or self.entry.default_train or FLOW_TRAIN
        return replace(base, seed=self.seed)

    def method_params(self) -> FrozenParams:
        """The chosen method's validated settings, taken from the matching fields."""
        params = self.entry.params
        fields = {**asdict(self), **asdict(self.lorahub)}
        return params.model_validate({name: fields[name] for name in params.model_fields})


def _frozen(model: nn.Module) -> dict[str, bool]:
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    return flags


def _restore(model: nn.Module, flags: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))


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
    entry = settings.entry
    params = settings.method_params()
    run = FitRun(
        handle,
        train_data,
        dev_data,
        settings.train_config(),
        pad_id,
        seed=settings.seed,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
    )
    flags = _frozen(handle.model)
    try:
        return entry.fit(run, params)
    finally:
        _restore(handle.model, flags)


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
    ``options`` override :class:`FuseSettings` fields (``method="cat-weights"``, ...).
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
