"""``lorafuse world ...``: build and evaluate the skill world, and run its studies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lorafuse.cli.options import (
    COUNT,
    SEED,
    choice,
    world_profiles,
)

world_app = typer.Typer(
    help="The built-in skill world: a small base model, skill LoRAs and composite tasks, built on a CPU.",
    no_args_is_help=True,
)


def world_build(
    profile: Annotated[
        str, typer.Option(help="default (the study) | tiny (for tests).", callback=choice(world_profiles))
    ] = "default",
    out_dir: Annotated[
        Path | None,
        typer.Option("--dir", help="World folder [default: $LORAFUSE_HOME/world/<profile>-seed<seed>]."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of everything in the world.", callback=SEED)] = 0,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a complete build exists.")] = False,
) -> None:
    """Build the skill world deterministically (reusing a complete build), with progress.

    Writes data (train/dev/test per task), a word-level tokenizer, a pretrained LlamaForCausalLM,
    one PEFT LoRA per skill and pool task, one oracle LoRA per composite task, and manifest.json
    (seed, versions, SHA-256 of every file).
    """
    from lorafuse.skillworld import build_world, is_complete
    from lorafuse.skillworld.build import default_world_dir, read_manifest

    root = out_dir or default_world_dir(profile, seed)
    reused = not force and is_complete(root, profile, seed)
    path = build_world(root, profile=profile, seed=seed, force=force)
    manifest = read_manifest(path) or {}
    how = "reused" if reused else f"built in {manifest.get('build_seconds', '?')} s"
    typer.echo(f"world {profile} (seed {seed}) {how}: {path}")


def world_eval(
    profile: Annotated[
        str, typer.Option(help="Which world: default | tiny.", callback=choice(world_profiles))
    ] = "default",
    out_dir: Annotated[
        Path | None, typer.Option("--dir", help="World folder [default: as world build].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the world.", callback=SEED)] = 0,
    limit: Annotated[
        int | None, typer.Option(help="At most this many test examples per task.", callback=COUNT)
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the matrix as JSON here.")
    ] = None,
    variant: Annotated[
        str,
        typer.Option(
            help="all | faithful | translate: one family's skills, composites and oracles (no pool).",
            callback=choice(("all", "faithful", "translate")),
        ),
    ] = "all",
) -> None:
    """Print the accuracy matrix (exact match, %): base, each skill LoRA and each oracle on every task,
    then the world's conditions per variant (single LoRAs ≥ 80 % on their skill, base ≤ 5 %,
    single LoRAs ≤ 20 % on the composites, oracles ≥ 30 points above them).

    Builds the world first if needed (with --variant, only that family's LoRAs); the matrix is
    also recorded in the world's manifest.json.
    """
    from lorafuse._io import check_output_path, write_text_atomic
    from lorafuse.skillworld import build_world
    from lorafuse.skillworld.build import default_world_dir, variant_loras
    from lorafuse.skillworld.data import FAITHFUL_SKILLS, SKILLS, VARIANTS
    from lorafuse.skillworld.evaluate import accuracy_matrix, format_matrix, record_eval

    loras = None if variant == "all" else variant_loras(variant)
    root = build_world(out_dir or default_world_dir(profile, seed), profile=profile, seed=seed, loras=loras)
    if json_out:
        check_output_path(json_out, {"--dir": root}, what="--json")
    if variant == "all":
        result = accuracy_matrix(root, limit=limit)
    else:
        skills = FAITHFUL_SKILLS if variant == "faithful" else SKILLS
        result = accuracy_matrix(root, limit=limit, skills=skills, composites=VARIANTS[variant], pool=False)
    record_eval(root, result)
    typer.echo(format_matrix(result))
    if json_out:
        write_text_atomic(
            json_out, json.dumps(result, indent=2) + "\n", inputs={"--dir": root}, what="--json"
        )


world_app.command("build")(world_build)
world_app.command("eval")(world_eval)
