"""How a saved fusion weights its bank: one :class:`Weighting` per stored kind.

A :class:`~lorafuse.fusion.artefact.Fusion` stores a kind and its tensors; the kind's weighting
says which tensors (and shapes) it holds, builds the weight rule from them and installs it on an
attached bank. Nothing else interprets a fusion, so a new kind is one class and one registration
(:data:`lorafuse.fusion.artefact.WEIGHTINGS`)::

    kind          tensors                                        weights per forward
    static        weights (k,)                                   none: w set once on the bank
    cat-weights   logits (modules, k)                            softmax(logits[m]) per module m
    lora-flow     gate.weight (G, k, hidden), gate.bias (G, k)   per token, from each layer's input

The methods that *learn* a fusion (``lora-flow``, ``cat-weights``, ``lorahub``, ``average``) are in
:mod:`lorafuse.fusion.methods`; ``lorahub`` and ``average`` store ``static`` fusions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

from lorafuse._registry import FrozenParams, NoParams

if TYPE_CHECKING:
    from lorafuse.fusion.gate import GateConfig
    from lorafuse.runtime import AttachedBank

Shapes = dict[str, tuple[int, ...]]


class Weighting:
    """One stored kind of fusion: its tensors, its weight rule and how it is installed.

    Subclasses set ``name``, ``paper``, ``summary``, ``dynamic`` (a rule computes the weights
    in every forward pass; ``False``: one static vector) and ``gated``, and implement :meth:`shapes`,
    :meth:`build_rule` and, where needed, :meth:`check` and :meth:`install`.
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    params: ClassVar[type[FrozenParams]] = NoParams
    dynamic: ClassVar[bool] = True
    gated: ClassVar[bool] = False  # the fusion carries a :class:`GateConfig` (``fusion.json``'s ``gate``)

    def shapes(self, k: int, gate: GateConfig | None, module_paths: Sequence[str]) -> Shapes:
        """The tensors a fusion of this kind over ``k`` LoRAs holds, by name, with their shapes."""
        raise NotImplementedError

    def check(self, k: int, gate: GateConfig | None, module_paths: Sequence[str]) -> str | None:
        """What is wrong with these settings for this kind (a message), or ``None``."""
        return None

    def bank_problem(self, handle: AttachedBank, module_paths: Sequence[str]) -> str | None:
        """What keeps this kind from weighting the bank of ``handle`` (a message), or ``None``."""
        return None

    def build_rule(
        self, tensors: Mapping[str, Tensor], gate: GateConfig | None, module_paths: Sequence[str]
    ) -> nn.Module | None:
        """A new module holding the weight rule (``None`` for a kind without one)."""
        raise NotImplementedError

    def install(self, rule: nn.Module | None, tensors: Mapping[str, Tensor], handle: AttachedBank) -> None:
        """Make the bank of ``handle`` take its weights from ``rule`` (moved to the bank's device)."""
        handle.set_source(rule)  # type: ignore[arg-type]


class StaticWeighting(Weighting):
    """One weight per LoRA for every token and module: ``h = W0 x + Σ_i w_i s_i B_i A_i x``."""

    name = "static"
    summary = "one weight per LoRA (average, LoraHub, a hand-written composition)"
    dynamic = False

    def shapes(self, k: int, gate: GateConfig | None, module_paths: Sequence[str]) -> Shapes:
        return {"weights": (k,)}

    def build_rule(
        self, tensors: Mapping[str, Tensor], gate: GateConfig | None, module_paths: Sequence[str]
    ) -> None:
        return None

    def install(self, rule: nn.Module | None, tensors: Mapping[str, Tensor], handle: AttachedBank) -> None:
        handle.set_weights(tensors["weights"])
