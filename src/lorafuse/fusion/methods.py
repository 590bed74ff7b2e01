"""The methods that learn a fusion, one registry entry each: :data:`FUSION_METHODS`.

Every entry has the one fitting signature::

    fit(run: FitRun, params) -> Fusion

``run`` holds the attached bank (base and LoRAs frozen), the encoded examples and the training
budget; ``params`` is the method's frozen pydantic settings. The entry also names the stored kind
of fusion it writes (:data:`lorafuse.fusion.artefact.WEIGHTINGS`) and its training defaults.

| method        | what is learned                                           | stored as     |
| ------------- | --------------------------------------------------------- | ------------- |
| ``lora-flow`` | per-layer gates, per-token weights (LoRA-Flow)            | ``lora-flow`` |
| ``cat-weights`` | one softmax-normalised weight per LoRA per module (Soups)| ``cat-weights``|
| ``lorahub``   | one weight per LoRA in [-1.5, 1.5], + 0.05·mean|w|        | ``static``    |
| ``average``   | nothing: ``w_i = 1/k``                                    | ``static``    |

``cat`` is accepted as an old spelling of ``cat-weights`` (the merge method ``cat`` concatenates
LoRAs; this one learns their weights).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from lorafuse._data import Encoded
from lorafuse._registry import FrozenParams, NoParams, Registry
from lorafuse.fusion.artefact import Fusion
from lorafuse.fusion.cat_weights import CatWeights
from lorafuse.fusion.flow import flow_for
from lorafuse.fusion.lorahub import LoraHubConfig, lorahub_search
from lorafuse.runtime import AttachedBank
from lorafuse.train.loop import TrainConfig, TrainResult, dev_loss, train

# LoRA-Flow's recipe (paper code): 5 epochs, AdamW β (0.9, 0.95), eps 1e-5, weight decay 0.1, cosine
# with 20 % warm-up, clip 1.0, lr 1e-3, batch 4.
FLOW_TRAIN = TrainConfig(epochs=5, batch_size=4, lr=1e-3, warmup=0.2, weight_decay=0.1, eps=1e-5)
# CAT: the same budget; scalars per module need a larger step (the recycling study uses 5e-2).
CAT_TRAIN = replace(FLOW_TRAIN, lr=1e-2, weight_decay=0.0)


@dataclass(frozen=True)
class FitRun:
    """What every fitting method gets: the bank, the examples and the training budget."""

    handle: AttachedBank
    train_data: Sequence[Encoded]
    dev_data: Sequence[Encoded] | None
    train: TrainConfig  # seeded; used by the methods trained with the shared loop
    pad_id: int
    seed: int = 0
    checkpoint_dir: str | Path | None = None
    progress: bool = True


class LoRAFlowParams(FrozenParams):
    """LoRA-Flow's gate options (:class:`~lorafuse.fusion.gate.GateConfig`)."""

    granularity: Literal["layer", "module", "step"] = "layer"
    temperature: float = Field(1.0, gt=0)
    bias_in_softmax: bool = False
    start: int | None = -1  # the LoRA the gate starts on (the last, the task LoRA); None = uniform


class LoraHubParams(FrozenParams):
    """LoraHub's search: ``budget`` evaluations over ``w ∈ [-bound, bound]^k``, penalty ``l1·mean|w|``."""

    budget: int = Field(40, ge=1)
    bound: float = Field(1.5, gt=0)
    l1: float = Field(0.05, ge=0)


FitFn = Callable[[FitRun, Any], Fusion]


@dataclass(frozen=True, kw_only=True)
class FusionMethod:
    """One way of learning a fusion: name, source, settings, training defaults, the fit."""

    name: str
    paper: str
    params: type[FrozenParams]
    summary: str
    stores: str  # the kind of fusion it writes (a WEIGHTINGS name)
    fit: FitFn
    default_train: TrainConfig | None = None  # None: not trained with the shared loop


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


def _trained(run: FitRun, rule: torch.nn.Module, desc: str) -> dict[str, Any]:
    """Train ``rule``'s parameters with the shared loop; the training record for ``info``."""
    started = time.perf_counter()
    result = train(
        run.handle.model,
        rule.parameters(),
        run.train_data,
        run.train,
        pad_id=run.pad_id,
        dev_data=run.dev_data,
        checkpoint_dir=run.checkpoint_dir,
        desc=desc,
        progress=run.progress,
    )
    return {
        "fusion": desc,
        "train": asdict(run.train),
        "result": _summary(result, time.perf_counter() - started),
    }


def fit_lora_flow(run: FitRun, params: LoRAFlowParams) -> Fusion:
    """Zero-initialised gates trained on the examples: ``w_l = softmax(W_l x_l / T) + b_l``."""
    flow = flow_for(run.handle, **params.model_dump())
    info = _trained(run, flow, "lora-flow")
    tensors = {"gate.weight": flow.gates.weight.detach().cpu(), "gate.bias": flow.gates.bias.detach().cpu()}
    return Fusion("lora-flow", list(run.handle.names), tensors, gate=flow.config, info=info)


def fit_cat_weights(run: FitRun, params: NoParams) -> Fusion:
    """Zero-initialised logits ``c_m (k,)`` per module, trained: ``w_m = softmax(c_m)``."""
    handle = run.handle
    cat = CatWeights(list(handle.banks), handle.k)
    cat.to(next(iter(handle.banks.values())).A.device)
    handle.set_source(cat)  # type: ignore[arg-type]
    info = _trained(run, cat, "cat-weights")
    tensors = {"logits": cat.logits.detach().cpu()}
    return Fusion("cat-weights", list(handle.names), tensors, module_paths=cat.module_paths, info=info)


def fit_lorahub(run: FitRun, params: LoraHubParams) -> Fusion:
    """Gradient-free search of ``w`` minimising the training loss + ``l1 · mean|w|``."""
    handle, started = run.handle, time.perf_counter()

    def loss_of(w: torch.Tensor) -> float:
        with handle.weights(w):
            return dev_loss(handle.model, run.train_data, run.pad_id)

    config = LoraHubConfig(**params.model_dump(), seed=run.seed)
    weights, history = lorahub_search(loss_of, handle.k, config, progress=run.progress)
    handle.set_weights(weights)
    info = {
        "fusion": "lorahub",
        "config": asdict(config),
        "objective": history,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return Fusion("static", list(handle.names), {"weights": weights}, info=info)


def fit_average(run: FitRun, params: NoParams) -> Fusion:
    """No learning: ``w_i = 1/k``."""
    handle = run.handle
    weights = torch.full((handle.k,), 1.0 / handle.k)
    handle.set_weights(weights)
    return Fusion("static", list(handle.names), {"weights": weights}, info={"fusion": "average"})


FUSION_METHODS: Registry[FusionMethod] = Registry("fusion method")
FUSION_METHODS.register(
    FusionMethod(
        name="lora-flow",
        paper="Wang et al. 2024, LoRA-Flow, arXiv:2402.11455",
        params=LoRAFlowParams,
        summary="per-layer gates give per-token LoRA weights",
        stores="lora-flow",
        fit=fit_lora_flow,
        default_train=FLOW_TRAIN,
    )
)
FUSION_METHODS.register(
    FusionMethod(
        name="cat-weights",
        paper="Prabhakar et al. 2024, LoRA Soups (learned CAT), arXiv:2410.13025",
        params=NoParams,
        summary="one learned softmax weight per LoRA per module",
        stores="cat-weights",
        fit=fit_cat_weights,
        default_train=CAT_TRAIN,
    ),
    aliases=("cat",),
)
FUSION_METHODS.register(
    FusionMethod(
        name="lorahub",
        paper="Huang et al. 2023, LoraHub, arXiv:2307.13269",
        params=LoraHubParams,
        summary="gradient-free search of one weight per LoRA",
        stores="static",
        fit=fit_lorahub,
    )
)
FUSION_METHODS.register(
    FusionMethod(
        name="average",
        paper="",
        params=NoParams,
        summary="the uniform average w_i = 1/k (a baseline)",
        stores="static",
        fit=fit_average,
    )
)
