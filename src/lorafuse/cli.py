"""The ``lorafuse`` command: a thin map of verbs to library functions."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from lorafuse import __version__
from lorafuse.errors import LorafuseError

app = typer.Typer(
    name="lorafuse",
    help=(
        "Reuse a library of LoRA adapters on one frozen base LLM: inspect adapters and run them "
        "as a weighted bank (merge, fuse, route, compress and serve are built on the same bank)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorafuse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """lorafuse: merge, fuse, route, compress and serve LoRA adapters on one base model."""


@app.command()
def inspect(
    paths: Annotated[
        list[Path], typer.Argument(help="PEFT LoRA adapter folders.", show_default=False)
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per run (a list).")
    ] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle", help="Also read adapter_model.bin (loaded with weights_only=True)."
        ),
    ] = False,
) -> None:
    """Describe adapters: base model, ranks, alpha, scale, targets, size and ‖ΔW‖_F per module kind.

    Norms are computed in factored form (never forming ΔW), so inspecting a 7B adapter is fast.
    Exits with status 2 if any adapter cannot be read; the others are still shown.
    """
    from lorafuse.adapters import load_lora
    from lorafuse.adapters.summary import format_summary, summarize_lora

    summaries, failed = [], False
    for path in paths:
        try:
            summaries.append(summarize_lora(load_lora(path, allow_pickle=allow_pickle)))
        except LorafuseError as exc:
            failed = True
            typer.echo(f"error: {exc}", err=True)
    if as_json:
        typer.echo(json.dumps(summaries, indent=2))
    else:
        typer.echo("\n\n".join(format_summary(s) for s in summaries))
    if failed:
        raise typer.Exit(2)


@app.command()
def demo(
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="Where to build the demo models [default: $LORAFUSE_HOME/demo]."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the base model, adapters and inputs.")] = 0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results as JSON here.")
    ] = None,
) -> None:
    """Build a small Llama and three PEFT adapters, and check the bank against PEFT.

    Checks: one adapter at weight 1 equals PEFT; weights w equal PEFT's cat merge; a mixed batch
    (one adapter per row) generates PEFT's tokens with the KV cache; detach restores the base.
    """
    from lorafuse.demo import format_demo, run_demo, write_json

    result = run_demo(out_dir, seed)
    typer.echo(format_demo(result))
    if json_out:
        write_json(result, json_out)
    if not result["ok"]:
        raise typer.Exit(1)


def main() -> None:
    """Entry point: run the CLI, turning lorafuse errors into one clear line and status 2."""
    # Deprecation chatter between transformers and peft releases is not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        app()
    except LorafuseError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
