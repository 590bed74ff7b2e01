"""The ``lorafuse`` command: a thin map of verbs to library functions."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lorafuse import __version__
from lorafuse._checks import InvalidValueError
from lorafuse.cli_options import (
    COUNT,
    DTYPE,
    POSITIVE,
    SEED,
    check_settings,
    choice,
    names_of,
    parse_floats,
    parse_names,
    parse_settings,
)
from lorafuse.errors import LorafuseError

if TYPE_CHECKING:
    from lorafuse._io import OutputInputs

app = typer.Typer(
    name="lorafuse",
    help=(
        "Reuse a library of LoRA adapters on one frozen base LLM: inspect adapters and run them "
        "as a weighted bank (merge, fuse, route, compress and serve are built on the same bank)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorafuse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """lorafuse: merge, fuse, route, compress and serve LoRA adapters on one base model."""


def check_out(out: Path, inputs: OutputInputs, *, force: bool, flag: str = "--out") -> None:
    """Check an output before any work: never an input, nor inside or around one (``--force`` or
    not; an ``OutputPathError``: one line, status 2), leftovers of an interrupted write repaired,
    and an existing output only replaced with ``--force``."""
    from lorafuse._io import check_output_path, recover_leftovers

    check_output_path(out, inputs, what=flag)
    recover_leftovers(out)
    if out.exists() and not force:
        raise typer.BadParameter(f"{out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a folder")


@app.command()
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


def _merge_method(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    """``--method``: a merge method's canonical name; old spellings (``dare_ties``) are accepted."""
    from lorafuse.cli_options import check_choice, flag_of
    from lorafuse.merging import MERGE_METHODS

    if value is None or ctx.resilient_parsing:
        return value
    return check_choice(MERGE_METHODS.aliases().get(value, value), flag_of(param), MERGE_METHODS.names())


def _profiles() -> list[str]:
    from lorafuse.skillworld import PROFILES

    return sorted(PROFILES)


def _composites() -> list[str]:
    from lorafuse.skillworld.data import ALL_COMPOSITES

    return list(ALL_COMPOSITES)


@app.command()
def merge(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="PEFT adapter folders to merge, or one recipe .yaml.", show_default=False),
    ],
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            "-m",
            help="cat | linear | svd | ties | dare-linear | dare-ties | magnitude-prune | lego.",
            callback=_merge_method,
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output PEFT folder.")] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="Comma-separated weight per adapter, any sign [default: all 1]."),
    ] = None,
    rank: Annotated[
        int | None,
        typer.Option(
            help="Output rank K [default: Σr for cat, exact for linear, max r otherwise].", callback=COUNT
        ),
    ] = None,
    density: Annotated[
        float | None, typer.Option(help="Fraction of each ΔW kept (ties, dare-*, magnitude-prune).")
    ] = None,
    majority_sign_method: Annotated[
        str | None,
        typer.Option(help="total | frequency (ties, dare-ties).", callback=choice(("total", "frequency"))),
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="Other method settings, KEY=VALUE (repeatable)."),
    ] = None,
    union: Annotated[
        bool, typer.Option(help="Merge LoRAs that adapt different modules (missing = ΔW 0).")
    ] = False,
    allow_different_bases: Annotated[
        bool, typer.Option(help="Merge LoRAs whose configs name different base models.")
    ] = False,
    seed: Annotated[
        int, typer.Option(help="Seed for DARE masks, randomized SVD, k-means.", callback=SEED)
    ] = 0,
    dtype: Annotated[
        str | None,
        typer.Option(help="float32 | float16 | bfloat16 [default: the inputs' dtype].", callback=DTYPE),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Read adapter_model.bin (weights_only=True).")
    ] = False,
) -> None:
    """Merge several LoRAs into one PEFT adapter, without training.

    Methods work on ΔW = Σ w_i s_i B_i A_i (never on A and B separately, so negative weights are
    exact), one module at a time; rank reduction uses a factored or randomized SVD, never a full
    SVD of a dense matrix. The recipe and versions are written to OUT/lorafuse.json.

    Examples:

      lorafuse merge --method svd --rank 16 --weights 1,0.5 --out merged math zh

      lorafuse merge --method ties --density 0.3 --out merged a b c

      lorafuse merge recipe.yaml
    """
    from lorafuse._checks import MAX_MAGNITUDE, check_number
    from lorafuse.adapters import load_lora, save_lora
    from lorafuse.cli_options import SEED_MAX, torch_dtype
    from lorafuse.merging import get_method, load_recipe
    from lorafuse.merging import merge as run_merge

    if len(inputs) == 1 and inputs[0].suffix in (".yaml", ".yml"):
        recipe = load_recipe(inputs[0])
        adapters = [Path(m.adapter) for m in recipe.models]
        weight_list: list[float] | None = [
            check_number(m.weight, f"{inputs[0]}: models[{i}].weight", low=-MAX_MAGNITUDE, high=MAX_MAGNITUDE)
            for i, m in enumerate(recipe.models)
        ]
        method_name, params = recipe.merge_method, dict(recipe.parameters)
        rank, union = recipe.rank, recipe.union
        seed = int(check_number(recipe.seed, f"{inputs[0]}: seed", integer=True, low=0, high=SEED_MAX))
        allow_different_bases = recipe.allow_different_bases
        dtype = dtype or recipe.dtype
        out = out or (Path(recipe.out) if recipe.out else None)
        flags, where = {}, f"{inputs[0]}: parameters."
    else:
        if method is None:
            raise typer.BadParameter("--method is required unless a recipe .yaml is given")
        adapters, method_name = inputs, method
        weight_list = parse_floats(weights, "--weights")
        if weight_list is not None and len(weight_list) != len(adapters):
            raise InvalidValueError(
                f"--weights gives {len(weight_list)} weight(s) for {len(adapters)} adapter(s): {weights!r}"
            )
        params = parse_settings(settings or [])
        flags = {}
        if density is not None:
            params["density"], flags["density"] = density, "--density"
        if majority_sign_method is not None:
            params["majority_sign_method"] = majority_sign_method
            flags["majority_sign_method"] = "--majority-sign-method"
        where = "--set "
    spec = get_method(method_name)  # a recipe's method is checked here, the flag's by its callback
    check_settings(spec.params, params, method_name, flags, where=where)
    if out is None:
        raise typer.BadParameter("--out is required (or `out:` in the recipe)")
    sources = [*adapters, *(("recipe", r) for r in inputs if r.suffix in (".yaml", ".yml"))]
    check_out(out, sources, force=force)
    out_dtype = torch_dtype(dtype) if dtype else None
    loras = [load_lora(a, allow_pickle=allow_pickle) for a in adapters]
    try:
        merged = run_merge(
            loras,
            method_name,
            weight_list,
            rank,
            union=union,
            allow_different_bases=allow_different_bases,
            seed=seed,
            dtype=out_dtype,
            **params,
        )
    except ValueError as exc:  # bad settings, incompatible LoRAs: one clear line
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    save_lora(merged, out, inputs=sources)
    ranks = sorted({m.rank for m in merged.modules.values()})
    typer.echo(f"wrote {out} ({method_name}, {len(merged)} modules, rank {', '.join(map(str, ranks))})")


@app.command()
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
        str, typer.Option(help="Skill world: default | tiny (for tests).", callback=choice(_profiles))
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
            callback=names_of(_composites),
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
    from lorafuse.skillworld.report import format_table, write_report
    from lorafuse.skillworld.study import composition_study

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
    result = composition_study(
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
    typer.echo(format_table(result))
    typer.echo(f"\nreport: {report}/study.md, study.json, study.png ({result['total_seconds']} s in all)")


def _oracles_and_singles(composites: list[str]) -> set[str]:
    from lorafuse.skillworld.data import composite_loras

    return {n for c in composites for n in (*composite_loras(c), f"oracle_{c}")}


world_app = typer.Typer(
    help="The built-in skill world: a small base model, skill LoRAs and composite tasks, built on a CPU.",
    no_args_is_help=True,
)
app.add_typer(world_app, name="world")


@world_app.command("build")
def world_build(
    profile: Annotated[
        str, typer.Option(help="default (the study) | tiny (for tests).", callback=choice(_profiles))
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


@world_app.command("eval")
def world_eval(
    profile: Annotated[
        str, typer.Option(help="Which world: default | tiny.", callback=choice(_profiles))
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


@world_app.command("merge-study")
def world_merge_study(
    profile: Annotated[
        str, typer.Option(help="Which world: default | tiny.", callback=choice(_profiles))
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
    from lorafuse.skillworld.merge_study import format_study, merge_study

    root = build_world(out_dir or default_world_dir(profile, seed), profile=profile, seed=seed)
    if json_out:
        check_output_path(json_out, {"--dir": root}, what="--json")
    result = merge_study(root, limit=limit, seed=seed)
    matrix = (read_manifest(root) or {}).get("eval", {}).get("matrix")
    typer.echo(format_study(result, matrix))
    if json_out:
        write_text_atomic(
            json_out, json.dumps(result, indent=2) + "\n", inputs={"--dir": root}, what="--json"
        )


@world_app.command("flow-ablation")
def world_flow_ablation(
    profile: Annotated[
        str, typer.Option(help="Which world: default | tiny.", callback=choice(_profiles))
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
    from lorafuse.skillworld.study import flow_ablation, format_ablation

    root = build_world(out_dir or default_world_dir(profile, seed), profile=profile, seed=seed)
    if json_out:
        check_output_path(json_out, {"--dir": root}, what="--json")
    result = flow_ablation(root, seeds=tuple(range(seeds)), limit=limit)
    typer.echo(format_ablation(result))
    if json_out:
        write_text_atomic(
            json_out, json.dumps(result, indent=2) + "\n", inputs={"--dir": root}, what="--json"
        )


from lorafuse import cli_fuse  # noqa: E402, F401  (registers fuse, generate, explain)
from lorafuse.cli_compress import register as _register_compress  # noqa: E402

_register_compress(app, world_app)


class _StderrNotices(logging.Handler):
    """Library notices (``logging.getLogger("lorafuse.notices")``) as plain lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # a closed stream must not turn a notice into a crash
            self.handleError(record)


def _show_notices() -> None:
    """Send lorafuse's notices to the user (such as a capped ``--max-new-tokens``) to stderr, unprefixed."""
    logger = logging.getLogger("lorafuse.notices")
    if not any(isinstance(h, _StderrNotices) for h in logger.handlers):
        logger.addHandler(_StderrNotices(logging.WARNING))
        logger.propagate = False


def main() -> None:
    """Entry point: run the CLI, turning lorafuse errors into one clear line and status 2.

    ``--debug`` (anywhere on the command line) or ``LORAFUSE_DEBUG=1`` shows the traceback
    instead. An error that is not a lorafuse error is a bug: it is reported in one line with
    status 1 and a request to rerun with ``--debug``.
    """
    import os

    # Deprecation chatter between transformers and peft releases is not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning)
    _show_notices()
    debug = "--debug" in sys.argv[1:] or os.environ.get("LORAFUSE_DEBUG", "") not in ("", "0")
    if "--debug" in sys.argv[1:]:
        sys.argv.remove("--debug")
    try:
        app()
    except LorafuseError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        typer.echo(
            f"error: unexpected {type(exc).__name__}: {exc} (a bug in lorafuse; rerun with --debug "
            "for the traceback and report it)",
            err=True,
        )
        sys.exit(1)


from lorafuse.cli_route import register_route  # noqa: E402  (issue 7: route commands)

register_route(app, world_app)

from lorafuse.cli_serve import register as _register_serve  # noqa: E402  (issue 8: serve)

_register_serve(app)

from lorafuse.cli_models import register as _register_models  # noqa: E402

_register_models(app)

from lorafuse.cli_library import register_library  # noqa: E402  (issue 17: the adapter library)

register_library(app)

if __name__ == "__main__":
    main()
