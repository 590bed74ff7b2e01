"""``lorafuse merge``: training-free merges of several LoRAs into one PEFT adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorafuse._checks import InvalidValueError
from lorafuse.cli.options import (
    COUNT,
    DTYPE,
    SEED,
    check_out,
    check_settings,
    choice,
    parse_floats,
    parse_settings,
    registry_choice,
)


def _merge_methods() -> Any:
    from lorafuse.merging import MERGE_METHODS

    return MERGE_METHODS


def _expand_selections(inputs: list[Path]) -> list[Path]:
    """The folders, with each ``@selection.json`` replaced by its LoRAs' folders (best first)."""
    from lorafuse.library import read_selection

    out: list[Path] = []
    for item in inputs:
        out += list(read_selection(str(item)[1:]).values()) if str(item).startswith("@") else [item]
    return out


def merge(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="PEFT adapter folders to merge (or @selection.json), or one recipe .yaml.",
            show_default=False,
        ),
    ],
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            "-m",
            help="cat | linear | svd | ties | dare-linear | dare-ties | magnitude-prune | lego.",
            callback=registry_choice(_merge_methods),
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
    from lorafuse.cli.options import SEED_MAX, torch_dtype
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
        adapters, method_name = _expand_selections(inputs), method
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


def register(app: typer.Typer) -> None:
    app.command()(merge)
