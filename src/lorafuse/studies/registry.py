"""The registry of studies: each name → the function that runs it, one line, and the claim it tests.

A study reads a built skill world (:mod:`lorafuse.skillworld`) and returns a JSON-able result;
``format`` turns that result into the Markdown the CLI prints. ``lorafuse world studies`` lists
this registry and ``lorafuse world study NAME`` runs an entry (its options are the command's, in
:mod:`lorafuse.cli.studies`). Functions are imported when a study runs, not when it is listed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from lorafuse._registry import NoParams, Registry

__all__ = ["STUDIES", "Study", "get_study"]


@dataclass(frozen=True)
class Study:
    """One study: ``run`` and ``format`` are ``"module:function"`` names under ``lorafuse.studies``."""

    name: str
    summary: str  # one line, for listings
    paper: str  # the paper whose claim the study tests
    claim: str  # the claim, as the study tests it
    runner: str
    formatter: str
    params: type[NoParams] = NoParams  # options are the command's (the registry helper's protocol)

    @property
    def run(self) -> Callable[..., dict[str, Any]]:
        return _resolve(self.runner)

    @property
    def format(self) -> Callable[..., str]:
        return _resolve(self.formatter)


def _resolve(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(import_module(f"lorafuse.studies.{module}"), name)


STUDIES: Registry[Study] = Registry("study")

STUDIES.register(
    Study(
        name="composition",
        summary="LoRA-Flow against task-level fusion, merges and the two controls on every composite task.",
        paper="Wang et al. 2024, LoRA-Flow, arXiv:2402.11455; controls of arXiv:2602.12323",
        claim="per-token gates over a language and a task LoRA beat average, LoraHub, learned CAT and "
        "the best merge on composite tasks, and beat a fresh LoRA and the gates over random LoRAs",
        runner="composition:composition_study",
        formatter="report:format_table",
    )
)
STUDIES.register(
    Study(
        name="flow-ablation",
        summary="LoRA-Flow's ablations: gates per layer, per module or one for all; bias in softmax; 10x lr.",
        paper="Wang et al. 2024, LoRA-Flow, arXiv:2402.11455, its ablation study",
        claim="one gate per layer with the bias outside the softmax, at lr 1e-3, is the best variant",
        runner="flow_ablation:flow_ablation",
        formatter="flow_ablation:format_ablation",
    )
)
STUDIES.register(
    Study(
        name="merge",
        summary="Every training-free merge of each (language, task) LoRA pair and of the whole pool.",
        paper="Yadav et al. 2023, TIES-Merging, arXiv:2306.01708; Yu et al. 2023, DARE, arXiv:2311.03099; "
        "Zhao et al. 2024, LoRA-LEGO, arXiv:2409.16167",
        claim="a training-free merge keeps each LoRA's own skill but does not solve the composite task",
        runner="merge:merge_study",
        formatter="merge:format_study",
    )
)
STUDIES.register(
    Study(
        name="compress",
        summary="Full fine-tunes compressed by every method at each byte budget: accuracy and errors.",
        paper="Ping et al. 2024, Delta-CoMe, arXiv:2406.08903; Liu et al. 2024, BitDelta, arXiv:2402.10193",
        claim="mixed-precision singular vectors keep more of a fine-tune's accuracy than low-rank and "
        "BitDelta at the same byte budget",
        runner="compress:compress_study",
        formatter="compress:format_compress_study",
    )
)
STUDIES.register(
    Study(
        name="route",
        summary="Softmax and ReMix mixtures, the instance encoder and Arrow; accuracy and router health.",
        paper="Qiu et al. 2026, ReMix, arXiv:2603.10160; Ostapenko et al. 2024, Arrow, arXiv:2405.11157",
        claim="ReMix's equal weights over RLOO-trained top-k choices match or beat learned softmax "
        "weights and keep more experts in use",
        runner="route:route_study",
        formatter="route:format_route_study",
    )
)
STUDIES.register(
    Study(
        name="recycle",
        summary="A pool of 64 LoRAs: every selection rule x k x fusion method against a fresh LoRA "
        "and random weights.",
        paper="Recycling LoRAs for adaptive merging, arXiv:2602.12323",
        claim="which LoRAs are chosen matters little, random LoRAs do about as well, a fresh LoRA on "
        "the same examples is a strong baseline, and transfer needs highly relevant LoRAs",
        runner="recycle:recycle_study",
        formatter="recycle:format_recycle_study",
    )
)


def get_study(name: str) -> Study:
    """The study called ``name``; an unknown name is one line listing the studies."""
    return STUDIES.get(name)
