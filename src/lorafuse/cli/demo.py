"""``lorafuse demo``: the composition study on the skill world, with the bank-vs-PEFT check first."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafuse.cli.options import (
    COUNT,
    POSITIVE,
    SEED,
    choice,
    names_of,
    parse_names,
    world_composites,
    world_profiles,
)


def demo(
    full: Annotated[
        bool,
        typer.Option("--full", help="Both variants, 3 seeds, every test example (the published run)."),
    ] = False,
    quick: Annotated[bool, typer.Option("--quick", help="One seed and 100 test examples per task.")] = False,
    variant: Annotated[
        str,
        typer.Option(
            help="faithful (LoRA-Flow's setting) | translate (the first world's) | both "
            "[default: faithful, both with --full].",
            callback=choice(("faithful", "translate", "both")),
        ),
    ] = "faithful",
    profile: Annotated[
        str, typer.Option(help="Skill world: default | tiny (for tests).", callback=choice(world_profiles))
    ] = "default",
    world_dir: Annotated[
        Path | None, typer.Option("--dir", help="World folder [default: $LORAFUSE_HOME/world/...].")
    ] = None,
    world_seed: Annotated[int, typer.Option(help="Seed of the skill world.", callback=SEED)] = 0,
    seeds: Annotated[
        int | None,
        typer.Option(help="Training seeds per learned method [default: 1, 3 with --full].", callback=COUNT),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            help="Test examples per task [default: 200, 100 with --quick, all with --full].", callback=COUNT
        ),
    ] = None,
    composites: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated composite tasks [default: the variant's four].",
            callback=names_of(world_composites),
        ),
    ] = None,
    epochs: Annotated[
        float, typer.Option(help="Training epochs of the learned methods.", callback=POSITIVE)
    ] = 5,
    report: Annotated[Path, typer.Option(help="Report folder (study.md, study.json, study.png).")] = Path(
        "lorafuse-report"
    ),
    skip_check: Annotated[
        bool, typer.Option("--skip-check", help="Skip the bank-vs-PEFT check that runs first.")
    ] = False,
) -> None:
    """The main job: LoRA-Flow against task-level fusion, merges and controls on the skill world.

    Builds what the study needs of the skill world if it is missing (the core and the variant's
    LoRAs, cached for later commands), checks the bank against PEFT, then for every composite
    task trains and evaluates: base, each single LoRA, average, LoraHub, learned CAT, the best
    training-free merge, LoRA-Flow, a fresh LoRA and LoRA-Flow on random LoRAs (the two
    controls), and the oracle. Prints the table; writes Markdown, JSON, a bar chart and one HTML page.
    """
    import time

    import torch

    from lorafuse._io import check_output_path
    from lorafuse.demo import format_demo, run_demo
    from lorafuse.skillworld import build_world
    from lorafuse.skillworld.build import PROFILES, default_world_dir
    from lorafuse.skillworld.data import ALL_COMPOSITES, VARIANTS
    from lorafuse.studies.registry import get_study
    from lorafuse.studies.report import write_report

    started = time.perf_counter()
    if full and variant == "faithful":
        variant = "both"
    variants = ["faithful", "translate"] if variant == "both" else [variant]
    default = [c for v in variants for c in VARIANTS[v]]
    chosen = parse_names(composites, "--composites", ALL_COMPOSITES) if composites else default
    needed = sorted(_oracles_and_singles(chosen))
    if not skip_check:
        check = run_demo(None, 0)
        typer.echo(format_demo(check))
        if not check["ok"]:
            raise typer.Exit(1)
    root = build_world(
        world_dir or default_world_dir(profile, world_seed), profile=profile, seed=world_seed, loras=needed
    )
    check_output_path(report, {"--dir": root}, what="--report")
    typer.echo(f"skill world: {root}")
    torch.set_num_threads(PROFILES[profile].threads)
    n_seeds = seeds or (3 if full else 1)
    study = get_study("composition")
    result = study.run(
        root,
        seeds=tuple(range(n_seeds)),
        limit=limit or (None if full else 100 if quick else 200),
        composites=chosen,
        epochs=epochs,
        log=typer.echo,
    )
    flags = [f for f, on in (("--full", full), ("--quick", quick)) if on]
    result["command"] = " ".join(["lorafuse demo", *flags, f"--variant {variant}"])
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    write_report(result, report, inputs={"--dir": root})
    typer.echo("")
    typer.echo(study.format(result))
    typer.echo(f"\nreport: {report}/study.md, study.json, study.png ({result['total_seconds']} s in all)")


def _oracles_and_singles(composites: list[str]) -> set[str]:
    from lorafuse.skillworld.data import composite_loras

    return {n for c in composites for n in (*composite_loras(c), f"oracle_{c}")}


def register(app: typer.Typer) -> None:
    app.command()(demo)
