"""``lorafuse export vllm``: the served items as folders vLLM loads, and its launch line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lorafuse._checks import InvalidValueError, check_number
from lorafuse.cli.options import FOLDER, check_out

export_app = typer.Typer(
    help="Export adapters, compositions and static fusions for other serving engines.",
    no_args_is_help=True,
)


def _compositions(items: list[str] | None) -> dict[str, dict[str, float]]:
    """``NAME=a:0.7,b:0.3`` items as ``{name: {adapter: weight}}``."""
    out: dict[str, dict[str, float]] = {}
    for item in items or []:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise InvalidValueError(f"--compose takes NAME=ADAPTER:WEIGHT,..., got {item!r}")
        if name in out:
            raise InvalidValueError(f"--compose: the name {name!r} is given twice")
        parts: dict[str, float] = {}
        for piece in spec.split(","):
            adapter, colon, weight = piece.strip().partition(":")
            if not colon or not adapter or adapter in parts:
                raise InvalidValueError(
                    f"--compose {name}: {piece.strip()!r} is not ADAPTER:WEIGHT (each adapter once)"
                )
            try:
                value = float(weight)
            except ValueError:
                raise InvalidValueError(
                    f"--compose {name}: weight {weight!r} of {adapter} is not a number"
                ) from None
            parts[adapter] = check_number(value, f"--compose {name}: weight of {adapter}", low=-10, high=10)
        out[name] = parts
    return out


@export_app.command("vllm")
def export_vllm(
    adapters: Annotated[
        Path, typer.Option(help="The adapters folder `lorafuse serve` serves.", callback=FOLDER)
    ],
    base: Annotated[Path, typer.Option(help="Base model folder (vLLM's --model).", callback=FOLDER)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Export folder.")],
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="Tokenizer folder (default: the base's, or tokenizer/ beside it, as lorafuse serve)."
        ),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="vLLM's --dtype: float32 (lorafuse serve's default), bfloat16, float16, auto.")
    ] = "float32",
    compose: Annotated[
        list[str] | None,
        typer.Option(help="NAME=ADAPTER:WEIGHT,... a weighted composition to export as one adapter; repeat."),
    ] = None,
    dense: Annotated[
        bool, typer.Option(help="Also write dense compressed deltas (BitDelta, RTN) as full models.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing export folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the export's description as JSON.")] = False,
) -> None:
    """Write every static item of ADAPTERS as vLLM loads it, and print vLLM's launch line.

    PEFT adapters are copied; static fusions (average, LoraHub) and --compose compositions become
    exact `cat` adapters (rank Σ r_i, the weights folded in); low-rank compressed deltas become
    PEFT adapters; with --dense, dense deltas become full models. LoRA-Flow and learned CAT
    fusions weight their LoRAs per token or per module and are listed as needing lorafuse's
    engine. Where vLLM would tokenize a text prompt without the BOS lorafuse prepends, a copy of
    the tokenizer that adds it is written to tokenizer/ and passed with --tokenizer. The export
    folder holds export.json with every item, the reasons for those not exported, and the launch
    line.

    Example:

      lorafuse export vllm --adapters served/ --base models/base --compose mix=math:0.7,zh:0.3 --out vllm/
    """
    from lorafuse.export import VLLM_DTYPES
    from lorafuse.export import export_vllm as run_export

    compositions = _compositions(compose)
    if dtype not in VLLM_DTYPES:
        raise InvalidValueError(f"--dtype {dtype!r}: choose one of {', '.join(VLLM_DTYPES)}")
    check_out(out, {"--adapters": adapters, "--base": base}, force=force)
    export = run_export(
        adapters,
        out,
        base=base,
        tokenizer=tokenizer,
        dtype=dtype,
        compositions=compositions,
        dense=dense,
        overwrite=force,
    )
    if as_json:
        typer.echo(json.dumps(export.to_json(), indent=2))
        return
    for item in export.items:
        if item.exported_as:
            rank = f" rank {item.rank}" if item.rank else ""
            typer.echo(f"{item.name:<24} {item.exported_as}{rank}: {item.how}")
        else:
            typer.echo(f"{item.name:<24} not exported: {item.reason}")
    typer.echo(f"tokenizer: {export.tokenizer_how}")
    typer.echo(f"wrote {out} ({len(export.adapters)} adapters)")
    typer.echo(export.launch())


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")
