"""``lorafuse compress``, ``lorafuse decompress`` and ``lorafuse world compress-study``.

Registered on the main app by :func:`register` (one call at the bottom of ``cli.py``). Model
plumbing lives here: loading the fine-tuned model and a tokenizer to read the calibration text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Annotated, Any

import typer

from lorafuse._checks import InvalidValueError
from lorafuse.cli_options import (
    COUNT,
    FILE,
    FOLDER,
    NON_NEGATIVE_COUNT,
    SEED,
    check_settings,
    choice,
    flag_of,
    names_of,
    parse_names,
    parse_settings,
    read_text,
)
from lorafuse.errors import LorafuseError


def _methods() -> list[str]:
    from lorafuse.compress import COMPRESS_METHODS

    return sorted(COMPRESS_METHODS)


def _world_tasks() -> list[str]:
    from lorafuse.skillworld.data import COMPOSITES, POOL, SKILLS

    return [*SKILLS, *POOL, *COMPOSITES]


def check_budget(text: str, flag: str = "--budget") -> str:
    """``text`` if it is a ratio in (0, 1] such as ``1/16`` or ``0.05``, else one line naming ``flag``."""
    from lorafuse.compress import parse_budget

    try:
        parse_budget(text)
    except LorafuseError as exc:
        raise InvalidValueError(f"{flag}: {exc}") from None
    return text


def _budget(ctx: typer.Context, param: typer.CallbackParam, value: str) -> str:
    if not ctx.resilient_parsing:
        check_budget(value, flag_of(param))
    return value


def _budgets(ctx: typer.Context, param: typer.CallbackParam, value: str) -> str:
    if not ctx.resilient_parsing:
        for budget in parse_names(value, flag_of(param)):
            check_budget(budget, flag_of(param))
    return value


def _tokenizer(candidates: list[Path]):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    for path in candidates:
        if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(str(path))
    shown = ", ".join(map(str, candidates))
    raise typer.BadParameter(f"--calib needs a tokenizer; none found in {shown}; pass --tokenizer DIR")


def calibration_sequences(tokenizer, path: Path, samples: int, max_tokens: int, seed: int) -> list[Any]:  # type: ignore[no-untyped-def]
    """Up to ``samples`` lines of ``path`` (seeded choice), tokenized, ``<s>`` first, cut at ``max_tokens``.

    A ``.jsonl`` file gives ``prompt + " " + completion`` per row (the skill world's format);
    any other file one sample per non-empty line.
    """
    import torch

    lines = [line for line in read_text(path, "--calib").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise InvalidValueError(f"--calib {path}: row {i} is not JSON") from None
            if not isinstance(row, dict):
                raise InvalidValueError(f"--calib {path}: row {i} is not an object")
            rows.append(row)
        lines = [f"{r.get('prompt', '')} {r.get('completion', r.get('text', ''))}".strip() for r in rows]
    if not lines:
        raise typer.BadParameter(f"{path}: no calibration text")
    random.Random(seed).shuffle(lines)
    out = []
    for line in lines[:samples]:
        ids = tokenizer(line, add_special_tokens=True)["input_ids"]
        if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
            ids = [tokenizer.bos_token_id, *ids]
        out.append(torch.tensor(ids[:max_tokens]))
    return out


def calibration_for(
    finetuned: Path, calib: Path, tokenizer_dir: Path | None, samples: int, max_tokens: int, seed: int
) -> list[Any]:
    """The calibration token sequences of ``calib`` (tokenizer: ``--tokenizer`` or the fine-tune's)."""
    tokenizer = _tokenizer([p for p in (tokenizer_dir, finetuned) if p is not None])
    return calibration_sequences(tokenizer, calib, samples, max_tokens, seed)


def compress(
    base: Annotated[
        Path, typer.Option(help="Base model folder (HF, safetensors).", show_default=False, callback=FOLDER)
    ],
    finetuned: Annotated[
        Path,
        typer.Option(help="Fine-tuned model folder of the same base.", show_default=False, callback=FOLDER),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.", show_default=False)],
    method: Annotated[
        str,
        typer.Option(
            "--method", "-m", help="delta-come | low-rank | bitdelta | rtn.", callback=choice(_methods)
        ),
    ] = "delta-come",
    budget: Annotated[
        str, typer.Option(help="Bytes as a ratio of the fp16 delta: 1/16, 1/32, 0.05.", callback=_budget)
    ] = "1/16",
    calib: Annotated[
        Path | None,
        typer.Option(
            help="Calibration text (one sample per line, or .jsonl) for GPTQ and errors.", callback=FILE
        ),
    ] = None,
    schedule: Annotated[
        str | None, typer.Option(help="delta-come: BITS:COUNT,... (* = as many as fit), 'paper' or 'auto'.")
    ] = None,
    quantizer: Annotated[
        str | None, typer.Option(help="delta-come: gptq | rtn.", callback=choice(("gptq", "rtn")))
    ] = None,
    settings: Annotated[
        list[str] | None, typer.Option("--set", help="Other method settings, KEY=VALUE.")
    ] = None,
    keep_other: Annotated[
        str,
        typer.Option(
            help="Changed embeddings/norms/LM head: base (keep the base's) | delta (store).",
            callback=choice(("base", "delta")),
        ),
    ] = "base",
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer folder [default: the fine-tuned model's].", callback=FOLDER)
    ] = None,
    samples: Annotated[int, typer.Option(help="Calibration samples.", callback=COUNT)] = 128,
    max_tokens: Annotated[int, typer.Option(help="Tokens per calibration sample.", callback=COUNT)] = 2048,
    seed: Annotated[int, typer.Option(help="Seed for choosing calibration samples.", callback=SEED)] = 0,
    distill_steps: Annotated[
        int,
        typer.Option(
            help="bitdelta: steps of scale distillation on --calib (BitDelta uses 200).",
            callback=NON_NEGATIVE_COUNT,
        ),
    ] = 0,
    device: Annotated[
        str, typer.Option(help="Where SVD, GPTQ and calibration run: cpu | cuda | auto.")
    ] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
) -> None:
    """Compress FINETUNED − BASE: every attention/MLP projection at BUDGET of its fp16 size.

    Streams both checkpoints one tensor at a time. With --calib, the fine-tuned model reads the
    calibration text layer by layer (one decoder layer in memory at a time, as GPTQ pipelines
    do) to give each projection's input Hessian (GPTQ for delta-come; the activation error of
    every method). Writes a versioned folder (packed ints in safetensors +
    compressed.json) atomically.

    Example: lorafuse compress --base B --finetuned F --method delta-come --budget 1/16 --calib c.txt --out D
    """
    from lorafuse.cli import check_out
    from lorafuse.compress import compress_checkpoint, get_method, parse_schedule, save_compressed

    sources = {"--base": base, "--finetuned": finetuned, "--calib": calib, "--tokenizer": tokenizer}
    check_out(out, sources, force=force)
    params: dict[str, object] = parse_settings(settings or [])
    flags = {"schedule": "--set schedule"}  # the flag that gave each setting, for messages
    if schedule is not None:
        params["schedule"], flags["schedule"] = schedule, "--schedule"
    if quantizer is not None:
        params["quantizer"], flags["quantizer"] = quantizer, "--quantizer"
    check_settings(get_method(method).params, params, method, flags)
    if isinstance(params.get("schedule"), str) and params["schedule"] != "auto":
        try:
            parse_schedule(str(params["schedule"]))
        except LorafuseError as exc:
            raise InvalidValueError(f"{flags['schedule']}: {exc}") from None
    if distill_steps and (method != "bitdelta" or calib is None):
        raise typer.BadParameter("--distill-steps needs --method bitdelta and --calib")
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    calibration = calibration_for(finetuned, calib, tokenizer, samples, max_tokens, seed) if calib else None
    result = compress_checkpoint(
        base,
        finetuned,
        None if distill_steps else out,
        method=method,
        budget=budget,
        calibration=calibration,
        keep_other=keep_other,  # type: ignore[arg-type]
        params=params,
        overwrite=force,
        device=device,
        inputs=sources,
    )
    if distill_steps:
        result = _distill(result, base, finetuned, calib, tokenizer, samples, max_tokens, seed, distill_steps)
        save_compressed(result, out, overwrite=force, inputs=sources)
    report = result.info["modules"].values()

    def mean(key: str) -> float:
        values = [m[key] for m in report if key in m]
        return sum(values) / max(len(values), 1)

    typer.echo(
        f"wrote {out}: {method}, {len(result.modules)} modules, {result.nbytes:,} bytes = "
        f"{result.nbytes / result.fp16_nbytes:.4f} of fp16 ({result.fp16_nbytes:,}); mean weight error "
        f"{mean('weight_error'):.4f}"
        + (f", mean activation error {mean('activation_error'):.4f}" if calibration else "")
    )
    uncalibrated = result.info.get("uncalibrated") or []
    if calibration and uncalibrated:
        shown = ", ".join(uncalibrated[:3]) + (
            f" and {len(uncalibrated) - 3} more" if len(uncalibrated) > 3 else ""
        )
        typer.echo(
            f"warning: {len(uncalibrated)} of {len(result.modules)} compressed modules had no calibration "
            f"activations and were compressed by weight error only (an expert no calibration token was "
            f"routed to, say): {shown}; see 'uncalibrated' in {out / 'compressed.json'}",
            err=True,
        )
    changed = result.info["changed_other_tensors"]
    if changed:
        action = "stored as plain deltas" if keep_other == "delta" else "kept from the base"
        typer.echo(
            f"{len(changed)} non-linear tensors changed and were {action}: {', '.join(sorted(changed)[:4])}"
        )


def _distill(result, base, finetuned, calib, tokenizer_dir, samples, max_tokens, seed, steps):  # type: ignore[no-untyped-def]
    """BitDelta scale distillation: student = base + plain deltas + α·sign, teacher = the fine-tune."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorafuse.compress import apply_delta, distill_scales

    tokenizer = _tokenizer([p for p in (tokenizer_dir, finetuned) if p is not None])
    sequences = calibration_sequences(tokenizer, calib, samples, max_tokens, seed)
    student = apply_delta(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval(), result, linear=False
    )
    teacher = AutoModelForCausalLM.from_pretrained(str(finetuned), dtype=torch.float32).eval()
    return distill_scales(student, teacher, result, sequences, steps=steps, seed=seed)


def decompress(
    compressed: Annotated[
        Path, typer.Argument(help="A folder written by `lorafuse compress`.", show_default=False)
    ],
    base: Annotated[
        Path,
        typer.Option(help="The base model it was compressed against.", show_default=False, callback=FOLDER),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder.", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
) -> None:
    """Write BASE + the decompressed delta as a normal HF model folder (AutoModelForCausalLM loads it)."""
    from lorafuse.cli import check_out
    from lorafuse.compress import decompress as run

    check_out(out, {"--base": base, "COMPRESSED": compressed}, force=force)
    run(compressed, base, out, overwrite=force)
    typer.echo(f"wrote {out}")


def compress_study(
    out_dir: Annotated[
        Path | None, typer.Option("--dir", help="World folder [default: as world build].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the world and of the fine-tunes.", callback=SEED)] = 0,
    skills: Annotated[
        str, typer.Option(help="Comma-separated task skills to fine-tune.", callback=names_of(_world_tasks))
    ] = "math,list",
    budgets: Annotated[str, typer.Option(help="Comma-separated budgets.", callback=_budgets)] = "1/16,1/32",
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
    from lorafuse.studies.compress import compress_study as run
    from lorafuse.studies.compress import format_compress_study

    root = build_world(out_dir or default_world_dir("default", seed), profile="default", seed=seed)
    if json_out:
        check_output_path(json_out, {"--dir": root}, what="--json")
    result = run(
        root,
        skills=[s.strip() for s in skills.split(",") if s.strip()],
        budgets=[b.strip() for b in budgets.split(",") if b.strip()],
        steps=steps,
        seed=seed,
        limit=limit,
    )
    typer.echo(format_compress_study(result))
    if json_out:
        write_text_atomic(
            json_out, json.dumps(result, indent=2) + "\n", inputs={"--dir": root}, what="--json"
        )


def register(app: typer.Typer, world_app: typer.Typer) -> None:
    app.command("compress")(compress)
    app.command("decompress")(decompress)
    world_app.command("compress-study")(compress_study)
