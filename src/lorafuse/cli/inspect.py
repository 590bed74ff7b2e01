"""``lorafuse inspect``: describe PEFT adapters without loading a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lorafuse.errors import LorafuseError


def inspect(
    paths: Annotated[list[Path], typer.Argument(help="PEFT LoRA adapter folders.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per run (a list).")] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option("--allow-pickle", help="Also read adapter_model.bin (loaded with weights_only=True)."),
    ] = False,
) -> None:
    """Describe adapters: base model, ranks, alpha, scale, targets, size and ‖ΔW‖_F per module kind.

    Norms are computed in factored form (never forming ΔW), so inspecting a 7B adapter is fast.
    An adapter that cannot be read, whatever the reason, does not stop the others: they are all
    shown, then each failure is listed on one line and the exit status is 2.
    """
    from lorafuse.adapters import load_lora
    from lorafuse.adapters.summary import format_summary, summarize_lora

    summaries, failures = [], []
    for path in paths:
        try:
            summaries.append(summarize_lora(load_lora(path, allow_pickle=allow_pickle)))
        except LorafuseError as exc:
            failures.append(str(exc) if str(path) in str(exc) else f"{path}: {exc}")
        except Exception as exc:  # a failure lorafuse did not foresee still must not hide the others
            failures.append(f"{path}: unexpected {type(exc).__name__}: {exc}")
    if as_json:
        typer.echo(json.dumps(summaries, indent=2))
    elif summaries:
        typer.echo("\n\n".join(format_summary(s) for s in summaries))
    for failure in failures:
        typer.echo(f"error: {failure}", err=True)
    if failures:
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.command()(inspect)
