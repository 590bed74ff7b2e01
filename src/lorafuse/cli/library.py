"""``lorafuse library``: catalogue folders of adapters (index, ls, show, stats) and select k for a task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from lorafuse.cli.loading import load_base, load_model_shapes
from lorafuse.cli.options import COUNT, DATA, SEED

library_app = typer.Typer(
    help=(
        "A catalogue of LoRA adapters in an embedded SQLite file: index folders (incremental), list, "
        "show and count them, and select the k best for a task."
    ),
    no_args_is_help=True,
)

DB_HELP = "Catalogue file [default: $LORAFUSE_HOME/library.sqlite]."


def _fmt_norm(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _ls_line(row: dict[str, Any]) -> str:
    ranks = ",".join(map(str, row.get("ranks") or [])) or "-"
    targets = ",".join(row.get("targets") or []) or "-"
    return (
        f"{row['name']:<32} {row['kind']:<10} {ranks:<10} {targets:<40} "
        f"{_fmt_norm(row.get('total_norm')):>10}  {row.get('base_model') or '-'}"
    )


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "id"}


@library_app.command("index")
def library_index(
    dirs: Annotated[list[Path], typer.Argument(help="Folders to scan (recursively).", show_default=False)],
    db: Annotated[Path | None, typer.Option("--db", help=DB_HELP)] = None,
    base: Annotated[
        Path | None,
        typer.Option("--base", help="Base model folder: adapters that do not fit it are marked broken."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run's counts as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Index PEFT adapters, lorafuse fusions and compressed deltas found under DIRS.

    Records name, path, SHA-256 of the files, base model, PEFT type, ranks, alphas, targets,
    parameters, ‖ΔW‖_F per module kind (factored) and each module's top right singular vector
    (float16). Unchanged files (same size and mtime) are not read again; each adapter is one
    transaction, so an interrupted run resumes; folders gone from DIRS are dropped. Adapters that
    cannot be used are kept with the reason (see `lorafuse library ls --broken`).
    """
    from dataclasses import asdict

    from lorafuse.library import index

    model = load_model_shapes(base) if base is not None else None
    report = index(db, dirs, base=model, progress=not quiet)
    typer.echo(json.dumps(asdict(report), indent=2) if as_json else report.line())


@library_app.command("ls")
def library_ls(
    db: Annotated[Path | None, typer.Option("--db", help=DB_HELP)] = None,
    base: Annotated[
        str | None, typer.Option("--base", help="Only adapters whose recorded base model contains this text.")
    ] = None,
    target: Annotated[
        list[str] | None,
        typer.Option("--target", help="Only adapters adapting this module kind (repeatable)."),
    ] = None,
    rank: Annotated[
        str | None, typer.Option("--rank", help="Largest rank: N (exactly), MIN:MAX, :MAX or MIN:.")
    ] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="peft | fusion | compressed.")] = None,
    broken: Annotated[
        bool, typer.Option("--broken", help="List the adapters that cannot be used, with why.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """List the catalogue's adapters (usable ones, or --broken ones with their reasons)."""
    from lorafuse.cli.options import check_choice
    from lorafuse.library import parse_rank, query

    if kind is not None:
        check_choice(kind, "--kind", ("peft", "fusion", "compressed"))
    span = parse_rank(rank)
    with _open(db) as con:
        rows = query(
            con, base=base, targets=target or [], rank=span, kind=kind, status="broken" if broken else "ok"
        )
    if as_json:
        typer.echo(json.dumps([_public(r) for r in rows], indent=2))
        return
    if broken:
        for row in rows:
            typer.echo(f"{row['name']}  [{row['problem']}]  {row['reason']}")
    else:
        typer.echo(f"{'name':<32} {'kind':<10} {'ranks':<10} {'targets':<40} {'‖ΔW‖_F':>10}  base")
        for row in rows:
            typer.echo(_ls_line(row))
    typer.echo(f"{len(rows)} adapter{'s' if len(rows) != 1 else ''}", err=True)


def _open(db: Path | None) -> Any:
    from contextlib import closing

    from lorafuse.library import connect

    return closing(connect(db, create=False))


@library_app.command("show")
def library_show(
    name: Annotated[str, typer.Argument(help="The adapter's catalogue name.", show_default=False)],
    db: Annotated[Path | None, typer.Option("--db", help=DB_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Everything the catalogue holds about one adapter: files, hashes, norms, modules, a fusion's LoRAs."""
    from lorafuse.library import get

    with _open(db) as con:
        row = get(con, name)
    if as_json:
        typer.echo(json.dumps(_public(row), indent=2))
        return
    lines = [
        f"{row['name']}  ({row['kind']}, {row['status']})",
        f"  path         {row['path']}",
        f"  sha256       {row['sha256']}",
        f"  base model   {row.get('base_model') or '(not recorded)'}",
    ]
    if row["status"] != "ok":
        lines.append(f"  problem      [{row['problem']}] {row['reason']}")
    for key, label in (("peft_type", "peft type"), ("method", "method")):
        if row.get(key):
            lines.append(f"  {label:<12} {row[key]}")
    if row.get("ranks"):
        lines.append(f"  rank(s)      {', '.join(map(str, row['ranks']))}")
    if row.get("alphas"):
        lines.append(f"  alpha(s)     {', '.join(map(str, row['alphas']))}")
    if row.get("targets"):
        lines.append(f"  targets      {', '.join(row['targets'])} ({row.get('num_modules')} modules)")
    if row.get("num_params") is not None:
        lines.append(f"  parameters   {row['num_params']:,} ({row.get('dtype') or '?'})")
    files = ", ".join(f"{n} ({f['size']:,} B)" for n, f in row["files"].items())
    lines.append(f"  files        {files}")
    if row.get("norms"):
        lines.append(f"  ‖ΔW‖_F       total {_fmt_norm(row.get('total_norm'))}")
        lines.append(f"    {'kind':<14}{'modules':>8}{'mean':>12}{'max':>12}{'total':>12}")
        for kind, n in row["norms"].items():
            lines.append(
                f"    {kind:<14}{n['modules']:>8}{n['mean']:>12.4g}{n['max']:>12.4g}{n['total']:>12.4g}"
            )
    for entry in (row.get("info") or {}).get("loras", []):
        held = entry.get("in_catalogue")
        where = f"catalogued as {held}" if held else "not catalogued"
        lines.append(f"  lora         {entry['name']}: {entry.get('path')} ({where})")
    typer.echo("\n".join(lines))


@library_app.command("stats")
def library_stats(
    db: Annotated[Path | None, typer.Option("--db", help=DB_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Counts by kind, problem, base model, target module and largest rank; total bytes and parameters."""
    from lorafuse.library import stats

    with _open(db) as con:
        found = stats(con)
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    typer.echo(
        f"{found['adapters']} adapters ({found['ok']} usable, {found['broken']} broken), "
        f"{found['bytes'] / 1e6:.1f} MB, {found['num_params']:,} parameters"
    )
    for key, label in (
        ("by_kind", "kind"),
        ("by_problem", "broken: problem"),
        ("by_base", "base model"),
        ("by_target", "target module"),
        ("by_max_rank", "largest rank"),
    ):
        if found[key]:
            typer.echo(f"  {label:<16} " + ", ".join(f"{k} {v}" for k, v in found[key].items()))


@library_app.command("select")
def library_select(
    base: Annotated[Path, typer.Option("--base", help="Base model folder.", show_default=False)],
    by: Annotated[str, typer.Option("--by", help="loss | similarity | random | norm.")] = "loss",
    train: Annotated[
        Path | None,
        typer.Option("--train", help="Examples of the task (needed by loss and similarity).", callback=DATA),
    ] = None,
    k: Annotated[int, typer.Option("--k", help="How many adapters to select.", callback=COUNT)] = 8,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write selection.json here.")] = None,
    db: Annotated[Path | None, typer.Option("--db", help=DB_HELP)] = None,
    seed: Annotated[int, typer.Option(help="Seed of --by random.", callback=SEED)] = 0,
    target: Annotated[
        list[str] | None,
        typer.Option("--target", help="Only adapters adapting this module kind (repeatable)."),
    ] = None,
    rank: Annotated[
        str | None, typer.Option("--rank", help="Largest rank: N, MIN:MAX, :MAX or MIN:.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Use the first N examples only [default: all].", callback=COUNT)
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per forward pass.", callback=COUNT)] = 16,
    group: Annotated[
        int, typer.Option(help="Adapters held in the serving pool at once (--by loss).", callback=COUNT)
    ] = 16,
    chat: Annotated[
        bool, typer.Option("--chat", help="Render prompt/completion rows with the chat template.")
    ] = False,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer folder [default: the base's].")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | float16 | bfloat16.")] = "float32",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N] | mps.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the selection as JSON.")] = False,
) -> None:
    """Rank the catalogue's adapters that fit the base and keep the best k.

    loss: each adapter's mean token loss on the examples, many adapters per forward pass through
    the serving pool (lowest first). similarity: |cos| between the examples' mean layer inputs and
    each module's stored top singular direction, averaged (Arrow-style; highest first). norm:
    largest ‖ΔW‖ first. random: seeded. Writes {"loras": {name: path}, "by", "scores", ...}.
    """
    from lorafuse._data import encode_rows
    from lorafuse.cli.options import check_choice, read_examples
    from lorafuse.library import BY, parse_rank, select, write_selection
    from lorafuse.library.select import model_shapes

    check_choice(by, "--by", BY)
    span = parse_rank(rank)
    examples: list[Any] = []
    pad_id = 0
    if by in ("loss", "similarity"):
        if train is None:
            raise typer.BadParameter(f"--by {by} needs --train FILE (examples of the task)")
        model, tok = load_base(base, tokenizer, dtype, device)
        rows = read_examples(train, "--train", typer.BadParameter)[: limit or None]
        examples = encode_rows(tok, rows, chat=chat, source="--train")
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        shapes = model_shapes(model)
    else:
        model, shapes = None, model_shapes(load_model_shapes(base))
    with _open(db) as con:
        selection = select(
            con,
            by,
            model=model,
            shapes=shapes,
            examples=examples,
            pad_id=pad_id,
            seed=seed,
            targets=target or [],
            rank=span,
            batch_size=batch_size,
            group=group,
            progress=True,
        )
    selection.info |= {"base": str(base), "train": str(train) if train else None}
    if out is not None:
        write_selection(selection, out, k)
    if as_json:
        typer.echo(json.dumps(selection.to_json(k), indent=2))
    else:
        better = "higher" if by != "loss" else "lower"
        typer.echo(f"{'#':>3}  {'name':<32} {by + ' (' + better + ' is better)':>28} {'max r':>6}  targets")
        for i, row in enumerate(selection.top(k), 1):
            targets = ",".join(row["targets"] or [])
            typer.echo(f"{i:>3}  {row['name']:<32} {row['score']:>28.6g} {row['max_rank']:>6}  {targets}")
        if "base_loss" in selection.info:
            typer.echo(f"     (base model loss {selection.info['base_loss']:.6g})")
    typer.echo(
        f"{len(selection.ranked)} candidates ranked, {len(selection.skipped)} skipped"
        + (f"; wrote {out}" if out else ""),
        err=True,
    )


def register(app: typer.Typer) -> None:
    """Add ``lorafuse library ...`` to ``app``."""
    app.add_typer(library_app, name="library")
