"""``lorafuse compress`` and ``lorafuse decompress``.

Calibration plumbing lives here: a tokenizer (``--tokenizer`` or the fine-tune's) reads the
calibration text; models load through :mod:`lorafuse.cli.loading`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Annotated, Any

import typer

from lorafuse._checks import InvalidValueError
from lorafuse.cli.loading import find_tokenizer, load_model, load_tokenizer
from lorafuse.cli.options import (
    COUNT,
    FILE,
    FOLDER,
    NON_NEGATIVE_COUNT,
    SEED,
    check_out,
    check_settings,
    choice,
    flag_of,
    parse_names,
    parse_settings,
    read_text,
)
from lorafuse.errors import LorafuseError


def _methods() -> list[str]:
    from lorafuse.compress import COMPRESS_METHODS

    return sorted(COMPRESS_METHODS)


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


def budgets_of(ctx: typer.Context, param: typer.CallbackParam, value: str) -> str:
    if not ctx.resilient_parsing:
        for budget in parse_names(value, flag_of(param)):
            check_budget(budget, flag_of(param))
    return value


def _tokenizer(candidates: list[Path]):  # type: ignore[no-untyped-def]
    found = find_tokenizer(candidates)
    if found is None:
        shown = ", ".join(map(str, candidates))
        raise typer.BadParameter(f"--calib needs a tokenizer; none found in {shown}; pass --tokenizer DIR")
    return load_tokenizer(found)


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
    from lorafuse.compress import apply_delta, distill_scales

    tokenizer = _tokenizer([p for p in (tokenizer_dir, finetuned) if p is not None])
    sequences = calibration_sequences(tokenizer, calib, samples, max_tokens, seed)
    student = apply_delta(load_model(base), result, linear=False)
    teacher = load_model(finetuned)
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
    from lorafuse.compress import decompress as run

    check_out(out, {"--base": base, "COMPRESSED": compressed}, force=force)
    run(compressed, base, out, overwrite=force)
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("compress")(compress)
    app.command("decompress")(decompress)
