"""Check that adapters fit a base model: every module exists, is a linear layer, has the shapes.

All problems are gathered into one :class:`CompatibilityError`, so a user fixing an adapter sees
every missing module and every shape mismatch at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorafuse.adapters.lora import LoRA
from lorafuse.errors import CompatibilityError


@dataclass(frozen=True)
class LinearShape:
    """``in_features``/``out_features`` of a layer a LoRA can adapt."""

    in_features: int
    out_features: int


def linear_shape(module: nn.Module) -> LinearShape | None:
    """Shape of ``nn.Linear`` or GPT-2's ``Conv1D`` (weight ``(in, out)``), else None.

    A wrapper that serves LoRAs on a layer (the runtime's pooled bank) names that layer in
    ``wrapped_linear``; its shape is the layer's.
    """
    wrapped = getattr(module, "wrapped_linear", None)
    if isinstance(wrapped, nn.Module):
        module = wrapped
    if isinstance(module, nn.Linear):
        return LinearShape(module.in_features, module.out_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight = module.weight  # (in, out)
        return LinearShape(int(weight.shape[0]), int(weight.shape[1]))
    return None


def check_compatible(lora: LoRA, model: nn.Module, *, source: str | None = None) -> None:
    """Raise :class:`CompatibilityError` listing every module of ``lora`` not fitting ``model``.

    Module paths are looked up with ``model.get_submodule``; each must be an ``nn.Linear`` (or a
    GPT-2 ``Conv1D``) with ``in_features == A.shape[1]`` and ``out_features == B.shape[0]``.
    """
    problems: list[str] = []
    modules = dict(model.named_modules())
    for path, factors in lora.modules.items():
        module = modules.get(path)
        if module is None:
            problems.append(f"  missing module {path} (LoRA A {tuple(factors.A.shape)})")
            continue
        shape = linear_shape(module)
        if shape is None:
            problems.append(f"  {path} is a {type(module).__name__}, not a linear layer")
            continue
        expected = (shape.out_features, shape.in_features)
        found = (factors.out_features, factors.in_features)
        if expected != found:
            problems.append(
                f"  shape mismatch at {path}: the model's layer is (out, in) = {expected}, the "
                f"LoRA gives {found} (A {tuple(factors.A.shape)}, B {tuple(factors.B.shape)})"
            )
    if problems:
        who = source or lora.metadata.get("source") or lora.name or "the LoRA"
        model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        raise CompatibilityError(
            f"{who} does not fit the base model {model_name} ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}; adapter trained for "
            f"{lora.base_model or 'an unrecorded base'}):\n" + "\n".join(problems)
        )
