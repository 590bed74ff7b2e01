"""Loading a base model and its tokenizer for a verb: the one loader every command uses.

:func:`load_model` and :func:`load_tokenizer` are the only loaders of the CLI (both call
:mod:`lorafuse._hf`, which the skill world and the studies use too); :func:`find_tokenizer`
finds a tokenizer folder among candidates, and :func:`load_base` is the whole of ``--base`` /
``--tokenizer`` / ``--dtype`` / ``--device`` for fuse, train-lora, generate, explain and serve.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import typer

from lorafuse.cli.options import check_device, torch_dtype

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def load_model(base: Path, dtype: str = "float32", device: str = "cpu") -> Any:
    """The causal LM in ``base`` in ``dtype`` on ``device``, in evaluation mode.

    ``dtype`` (float32 | float16 | bfloat16) and ``device`` (auto | cpu | cuda[:N] | mps, present
    on this machine) are checked first; ``auto`` under torchrun / ``accelerate launch`` is each
    process's own device.
    """
    from lorafuse._hf import load_model as hf_load_model

    torch_type = torch_dtype(dtype)
    device = check_device(device)
    if device == "auto":
        from lorafuse.train.loop import process_state

        device = str(process_state().device)
    return hf_load_model(base, dtype=torch_type, device=device)


def load_model_shapes(base: Path) -> Any:
    """``--base``'s architecture with its weights on the meta device (layer shapes only)."""
    from lorafuse._checks import InvalidValueError
    from lorafuse._hf import load_model_shapes as skeleton

    if not base.is_dir():
        raise InvalidValueError(f"--base {base}: no such model folder")
    try:
        return skeleton(base)
    except (OSError, ValueError) as exc:
        raise InvalidValueError(f"--base {base}: cannot read the model's config.json ({exc})") from None


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in ``folder``."""
    from lorafuse._hf import load_tokenizer as hf_load_tokenizer

    return hf_load_tokenizer(folder)


def find_tokenizer(candidates: Iterable[Path | None], files: Sequence[str] = TOKENIZER_FILES) -> Path | None:
    """The first of ``candidates`` holding one of ``files``, or ``None``."""
    return next((c for c in candidates if c and any((c / name).is_file() for name in files)), None)


def load_base(
    base: Path, tokenizer: Path | None, dtype: str = "float32", device: str = "auto"
) -> tuple[Any, Any]:
    """The base model (``AutoModelForCausalLM``) and its tokenizer (from ``tokenizer``, the base
    folder, or a ``tokenizer/`` folder beside it as in the skill world).

    ``dtype`` (float32 | float16 | bfloat16) and ``device`` (auto | cpu | cuda[:N] | mps, present
    on this machine) are checked first, so every verb loading a base refuses a bad one alike.
    """
    torch_dtype(dtype)
    check_device(device)
    if not base.is_dir():
        raise typer.BadParameter(f"--base {base}: no such folder")
    candidates = [tokenizer] if tokenizer else [base, base.parent / "tokenizer"]
    found = find_tokenizer(candidates, ("tokenizer_config.json",))
    if found is None:
        raise typer.BadParameter(f"no tokenizer in {', '.join(map(str, candidates))}; pass --tokenizer DIR")
    model = load_model(base, dtype, device)
    return model, load_tokenizer(found)
