"""The studies' commands: ``lorafuse world study NAME`` (and the old ``world <x>-study`` names)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from lorafuse._checks import InvalidValueError, check_number
from lorafuse.cli.compress import budgets_of
from lorafuse.cli.demo import demo
from lorafuse.cli.options import (
    COUNT,
    FILE,
    FOLDER,
    POSITIVE,
    SEED,
    choice,
    names_of,
    parse_ints,
    parse_names,
    read_text,
    world_composites,
    world_profiles,
    world_tasks,
)


def world_merge_study(
    profile: Annotated[
        str, typer.Option(help="Which world: default | tiny.", callback=choice(world_profiles))
    ] = "default",
    out_dir: Annotated[
        Path | None, typer.Option("--dir", help="World folder [default: as world build].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the world (and of the merges).", callback=SEED)] = 0,
    limit: Annotated[
        int | None, typer.Option(help="At most this many test examples per task.", callback=COUNT)
    ] = 100,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results as JSON here.")
    ] = None,
) -> None:
    """Merge each (language, task) LoRA pair and the whole pool with every method; score every task.

    Prints Markdown tables: per composite, accuracy on the composite / the task skill / the
    language skill for each method next to the single LoRAs; and the pool merge on every task.
    """
    from lorafuse._io import check_output_path, write_text_atomic
    from lorafuse.skillworld import build_world
    from lorafuse.skillworld.build import default_world_dir, read_manifest
    from lorafuse.studies.registry import get_study

    study = get_study("merge")

    root = build_world(out_dir or default_world_dir(profile, seed), profile=profile, seed=seed)
    if json_out:
        check_output_path(json_out, {"--dir": root}, what="--json")
    result = study.run(root, limit=limit, seed=seed)
    matrix = (read_manifest(root) or {}).get("eval", {}).get("matrix")
    typer.echo(study.format(result, matrix))
    if json_out:
        write_text_atomic(
            json_out, json.dumps(result, indent=2) + "\n", inputs={"--dir": root}, what="--json"
        )


def world_flow_ablation(
    profile: Annotated[
        str, typer.Option(help="Which world: default | tiny.", callback=choice(world_profiles))
    ] = "default",
    out_dir: Annotated[
        Path | None, typer.Option("--dir", help="World folder [default: as world build].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the world.", callback=SEED)] = 0,
    seeds: Annotated[int, typer.Option(help="Training seeds per variant.", callback=COUNT)] = 1,
    limit: Annotated[
        int | None, typer.Option(help="Test examples per composite task.", callback=COUNT)
    ] = 100,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results as JSON here.")
    ] = None,
) -> None:
    """LoRA-Flow's ablations on every composite task: gate per layer (the paper's), per module,
    one gate for all layers (step), the bias inside the softmax, and a 10× learning rate."""
    from lorafuse._io import check_output_path, write_text_atomic
    from lorafuse.skillworld import build_world
    from lorafuse.skillworld.build import default_world_dir
    from lorafuse.studies.registry import get_study

    study = get_study("flow-ablation")

    root = build_world(out_dir or default_world_dir(profile, seed), profile=profile, seed=seed)
    if json_out:
        check_output_path(json_out, {"--dir": root}, what="--json")
    result = study.run(root, seeds=tuple(range(seeds)), limit=limit)
    typer.echo(study.format(result))
    if json_out:
        write_text_atomic(
            json_out, json.dumps(result, indent=2) + "\n", inputs={"--dir": root}, what="--json"
        )


def compress_study(
    out_dir: Annotated[
        Path | None, typer.Option("--dir", help="World folder [default: as world build].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the world and of the fine-tunes.", callback=SEED)] = 0,
    skills: Annotated[
        str, typer.Option(help="Comma-separated task skills to fine-tune.", callback=names_of(world_tasks))
    ] = "math,list",
    budgets: Annotated[str, typer.Option(help="Comma-separated budgets.", callback=budgets_of)] = "1/16,1/32",
    steps: Annotated[int, typer.Option(help="Full fine-tuning steps per skill.", callback=COUNT)] = 600,
    limit: Annotated[
        int | None, typer.Option(help="At most this many test examples per task.", callback=COUNT)
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results as JSON here.")
    ] = None,
) -> None:
    """Full fine-tunes of the world's base, compressed by every method at each budget; accuracy and errors.

    Fine-tunes are cached in $LORAFUSE_HOME/compress-study/<world>-steps<N>/ (reused when complete).
    """
    from lorafuse._io import check_output_path, write_text_atomic
    from lorafuse.skillworld import build_world
    from lorafuse.skillworld.build import default_world_dir
    from lorafuse.studies.registry import get_study

    study = get_study("compress")

    root = build_world(out_dir or default_world_dir("default", seed), profile="default", seed=seed)
    if json_out:
        check_output_path(json_out, {"--dir": root}, what="--json")
    result = study.run(
        root,
        skills=[s.strip() for s in skills.split(",") if s.strip()],
        budgets=[b.strip() for b in budgets.split(",") if b.strip()],
        steps=steps,
        seed=seed,
        limit=limit,
    )
    typer.echo(study.format(result))
    if json_out:
        write_text_atomic(
            json_out, json.dumps(result, indent=2) + "\n", inputs={"--dir": root}, what="--json"
        )


def _route_methods() -> list[str]:
    from lorafuse.studies.route import METHODS

    return list(METHODS)


def _seed_list(ctx: typer.Context, param: typer.CallbackParam, value: str) -> str:
    """``--seeds``: comma-separated whole numbers in [0, 2**32 - 1] (checked, kept as text)."""
    if value is not None and not ctx.resilient_parsing:
        parse_ints(value, "--seeds")
    return value


def world_route_study(
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.", callback=_seed_list)] = "0,1,2",
    methods: Annotated[
        str,
        typer.Option(help="Comma-separated: softmax,remix,encoder,arrow.", callback=names_of(_route_methods)),
    ] = "softmax,remix,encoder,arrow",
    steps: Annotated[int, typer.Option(help="Training steps per run.", callback=COUNT)] = 300,
    experts: Annotated[int, typer.Option(help="New experts n (softmax, remix).", callback=COUNT)] = 8,
    top_k: Annotated[
        int, typer.Option("--top-k", help="LoRAs per token (every method).", callback=COUNT)
    ] = 2,
    samples: Annotated[int, typer.Option(help="ReMix M.", callback=COUNT)] = 4,
    limit: Annotated[int, typer.Option(help="Test examples per task.", callback=COUNT)] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the world.", callback=SEED)] = 0,
    world: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="An already built world folder [default: build/reuse default].", callback=FOLDER
        ),
    ] = None,
    threads: Annotated[int, typer.Option(help="Torch threads.", callback=COUNT)] = 2,
    merge_with: Annotated[
        Path | None,
        typer.Option(
            help="A previous --json result whose runs of other methods or seeds are kept.", callback=FILE
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON (updated after every run).")
    ] = None,
    png: Annotated[Path | None, typer.Option("--png", help="Plot effective experts per layer.")] = None,
) -> None:
    """Routing study on the default skill world: softmax and ReMix mixtures, instance encoder, Arrow.

    Prints accuracy per task (mean ± std over seeds) and effective experts / top share per layer.
    """
    import torch

    from lorafuse._io import versions
    from lorafuse.route import plot_health
    from lorafuse.skillworld import build_world
    from lorafuse.skillworld.build import default_world_dir
    from lorafuse.studies.registry import get_study
    from lorafuse.studies.route import ROUTE_TASKS, RouteStudySettings, health_curves

    study = get_study("route")

    chosen = parse_names(methods, "--methods")
    if {"softmax", "remix"} & set(chosen):
        check_number(top_k, f"--top-k (experts per token, of --experts {experts})", high=experts)
    if {"encoder", "arrow"} & set(chosen):
        check_number(
            top_k, f"--top-k (LoRAs per token, of the {len(ROUTE_TASKS)} world LoRAs)", high=len(ROUTE_TASKS)
        )
    previous = None
    if merge_with:
        try:
            previous = json.loads(read_text(merge_with, "--merge-with"))
        except (json.JSONDecodeError, RecursionError):
            raise InvalidValueError(f"--merge-with {merge_with}: not JSON") from None
        if not isinstance(previous, dict) or not isinstance(previous.get("runs"), list):
            raise InvalidValueError(f"--merge-with {merge_with}: not a route-study result (no 'runs' list)")
    torch.set_num_threads(threads)
    root = world or build_world(default_world_dir("default", seed), profile="default", seed=seed)
    settings = RouteStudySettings(
        experts=experts,
        top_k=top_k,
        samples=samples,
        steps=steps,
        limit=limit,
        seeds=tuple(parse_ints(seeds, "--seeds")),
        methods=tuple(chosen),
    )

    def save(result: dict[str, Any]) -> None:
        if previous is not None:
            redone = {(r["method"], r.get("seed")) for r in result["runs"]}
            kept = [r for r in previous["runs"] if (r["method"], r.get("seed")) not in redone]
            result = {**result, "runs": kept + result["runs"], "merged_from": str(merge_with)}
        result |= {"versions": versions(), "threads": threads, "world": str(root)}
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            tmp = json_out.with_name(f".{json_out.name}.tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            tmp.replace(json_out)
        saved.clear()
        saved.update(result)

    saved: dict[str, Any] = {}
    save(study.run(root, settings, on_run=save))
    typer.echo(study.format(saved))
    if png:
        plot_health(health_curves(saved), png, n_experts=experts)


def _ks_of(ctx: typer.Context, param: typer.CallbackParam, value: str) -> str:
    """``--ks``: comma-separated whole numbers >= 1 or ``all`` (checked, kept as text)."""
    if not ctx.resilient_parsing:
        _parse_ks(value)
    return value


def _parse_ks(value: str) -> tuple[int | str, ...]:
    out: list[int | str] = []
    for part in (p.strip() for p in value.split(",")):
        if part == "all":
            out.append("all")
            continue
        try:
            k = int(part)
        except ValueError:
            k = 0
        if k < 1:
            raise InvalidValueError(f"--ks {value!r}: each k is a whole number >= 1 or 'all', not {part!r}")
        out.append(k)
    if not out or len(set(out)) != len(out):
        raise InvalidValueError(f"--ks {value!r}: give one or more distinct values")
    return tuple(out)


def world_recycle_study(
    profile: Annotated[
        str, typer.Option(help="Which world: default | tiny.", callback=choice(world_profiles))
    ] = "default",
    out_dir: Annotated[
        Path | None, typer.Option("--dir", help="World folder [default: as world build].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the world.", callback=SEED)] = 0,
    seeds: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated training seeds [default: 0,1,2; 0 with --quick].", callback=_seed_list
        ),
    ] = None,
    composites: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated composite tasks [default: the faithful family's four; one with --quick].",
            callback=names_of(world_composites),
        ),
    ] = None,
    ks: Annotated[
        str, typer.Option("--ks", help="Comma-separated k values (or all).", callback=_ks_of)
    ] = "2,8,all",
    limit: Annotated[
        int | None, typer.Option(help="Test examples per composite [default: all].", callback=COUNT)
    ] = None,
    epochs: Annotated[
        float, typer.Option(help="Training epochs of every trained run.", callback=POSITIVE)
    ] = 5.0,
    quick: Annotated[
        bool, typer.Option("--quick", help="Shrink everything (a smoke run; its numbers mean nothing).")
    ] = False,
    threads: Annotated[int, typer.Option(help="Torch threads.", callback=COUNT)] = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every run as JSON here.")] = None,
    md_out: Annotated[Path | None, typer.Option("--md", help="Write the Markdown table here.")] = None,
    png: Annotated[Path | None, typer.Option("--png", help="Plot exact match against k per rule.")] = None,
    runs: Annotated[
        Path | None,
        typer.Option(
            "--runs",
            help="Runs log, one finished run per JSON line "
            "[default: <world>/recycle/full/runs-<settings>.jsonl].",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume",
            help="Skip the runs the log already holds (an interrupted study continues); "
            "--no-resume starts over.",
        ),
    ] = True,
    merge_runs: Annotated[
        list[Path] | None,
        typer.Option(
            "--merge-runs",
            help="Fold the runs of another log of the same world and settings into --runs first "
            "(repeatable): joins a study split over parallel processes by --composites or --seeds.",
        ),
    ] = None,
    report_only: Annotated[
        bool,
        typer.Option(
            "--report-only",
            help="Train nothing: the table, JSON and plot of the runs the log holds so far "
            "(a study still under way; missing cells show —).",
        ),
    ] = False,
) -> None:
    """The recycling study: a pool of LoRAs, every selection rule x k x fusion method, and the controls.

    Builds (or reuses) the pool in <world>/recycle/ and its catalogue, then for each composite task
    chooses k LoRAs by loss, similarity, random and norm, fuses them with LoraHub, learned CAT and
    LoRA-Flow, and compares with a fresh LoRA and with the same methods on random weights.
    Runs go seed by seed and each is appended to the runs log as it finishes, so a rerun of the
    same command resumes an interrupted study.
    """
    from dataclasses import replace

    import torch

    from lorafuse._io import check_output_path, write_text_atomic
    from lorafuse.skillworld import build_world
    from lorafuse.skillworld.build import default_world_dir
    from lorafuse.studies.recycle import (
        WORLD_LORAS,
        RecycleSettings,
        format_by_k,
        metrics_of,
        plot_recycle,
        quick_settings,
    )
    from lorafuse.studies.registry import get_study

    study = get_study("recycle")
    chosen_ks = _parse_ks(ks)
    seed_list = tuple(parse_ints(seeds, "--seeds")) if seeds else ((0,) if quick else (0, 1, 2))
    settings = quick_settings(seed_list) if quick else RecycleSettings(seeds=seed_list, epochs=epochs)
    settings = replace(settings, ks=chosen_ks)
    if composites:
        settings = replace(
            settings, composites=tuple(parse_names(composites, "--composites", world_composites()))
        )
    if limit:
        settings = replace(settings, limit=limit)
    torch.set_num_threads(threads)
    root = build_world(
        out_dir or default_world_dir(profile, seed), profile=profile, seed=seed, loras=list(WORLD_LORAS)
    )
    for flag, path in (("--json", json_out), ("--md", md_out), ("--png", png)):
        if path:
            check_output_path(path, {"--dir": root}, what=flag)
    if runs is not None and runs.is_dir():
        raise InvalidValueError(f"--runs {runs}: is a folder; give a file")
    result = study.run(
        root,
        settings,
        log=typer.echo,
        runs_log=runs,
        resume=resume,
        merge_runs=merge_runs or [],
        make_runs=not report_only,
    )
    table = study.format(result)
    typer.echo(table)
    if json_out:
        write_text_atomic(
            json_out, json.dumps(result, indent=2) + "\n", inputs={"--dir": root}, what="--json"
        )
    if md_out:  # the compact tables by k first, then every composite's cells
        summary = "\n\n".join(format_by_k(result, metric) for metric in metrics_of(result))
        write_text_atomic(md_out, f"{summary}\n\n{table}\n", inputs={"--dir": root}, what="--md")
    if png:
        plot_recycle(result, png)


# name in lorafuse.studies.registry → its command; the old `world <x>-study` names stay as aliases.
COMMANDS = {
    "composition": demo,
    "flow-ablation": world_flow_ablation,
    "merge": world_merge_study,
    "compress": compress_study,
    "route": world_route_study,
    "recycle": world_recycle_study,
}
OLD_NAMES = {
    "merge-study": "merge",
    "flow-ablation": "flow-ablation",
    "compress-study": "compress",
    "route-study": "route",
    "recycle-study": "recycle",
}


class _OneLineUsage(TyperCommand):
    """A command whose unknown option is a lorafuse error: one ``error: ...`` line and exit status
    2, like a bad value, instead of the usage screen."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        params = [*self.params, self.get_help_option(ctx)]
        known = {opt for param in params if param is not None for opt in (*param.opts, *param.secondary_opts)}
        for arg in args:
            if arg == "--":
                break
            name = arg.split("=", 1)[0]
            if name.startswith("--") and name not in known:
                raise InvalidValueError(
                    f"{ctx.command_path}: no such option {name} (see {ctx.command_path} --help)"
                )
        return super().parse_args(ctx, args)


ONE_LINE_USAGE = {"recycle"}


class _StudyGroup(TyperGroup):
    """``world study NAME``: a registered study's name (or an alias of it); an unknown one is a
    lorafuse error (one line listing the studies, exit status 2), not a usage screen."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        from lorafuse.studies.registry import STUDIES

        if ctx.resilient_parsing and cmd_name not in STUDIES:  # completion: no error, no command
            return None
        return super().get_command(ctx, STUDIES.canonical(cmd_name))


study_app = typer.Typer(
    cls=_StudyGroup,
    help="Run one registered study on the skill world: lorafuse world study NAME [OPTIONS] "
    "(lorafuse world studies lists them).",
    no_args_is_help=True,
)


def world_studies(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """List the registered studies: name, what each runs, and the paper's claim it tests."""
    from lorafuse.studies.registry import STUDIES

    rows = [
        {"name": s.name, "summary": s.summary, "claim": s.claim, "paper": s.paper} for s in STUDIES.values()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        typer.echo(f"{row['name']:<{width}}  {row['summary']}")
        typer.echo(f"{'':<{width}}  tests: {row['claim']} ({row['paper']})")


def register(world_app: typer.Typer) -> None:
    """``world study NAME``, ``world studies`` and the old ``world <x>-study`` names (hidden)."""
    from lorafuse.studies.registry import STUDIES

    assert set(COMMANDS) == set(STUDIES), "every registered study needs a command, and only those"
    for name in STUDIES:
        cls = _OneLineUsage if name in ONE_LINE_USAGE else None
        study_app.command(name, help=None, cls=cls)(COMMANDS[name])
    world_app.add_typer(study_app, name="study")
    world_app.command("studies")(world_studies)
    for old, name in OLD_NAMES.items():
        cls = _OneLineUsage if name in ONE_LINE_USAGE else None
        world_app.command(old, hidden=True, cls=cls)(COMMANDS[name])
