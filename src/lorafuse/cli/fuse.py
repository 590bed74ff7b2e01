"""``lorafuse fuse``, ``train-lora`` and ``generate``: learned composition on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorafuse.cli.loading import load_base
from lorafuse.cli.options import (
    CHAT_HELP,
    COUNT,
    DATA,
    DEVICE,
    DTYPE,
    FOLDER,
    POSITIVE,
    ROWS_HELP,
    SEED,
    GradientCheckpointing,
    check_out,
    choice,
    read_examples,
    registry_choice,
)


def _fusion_methods() -> Any:
    from lorafuse.fusion import FUSION_METHODS

    return FUSION_METHODS


def pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """``NAME=DIR`` items (in order) as ``{name: dir}``; ``@FILE`` adds every LoRA of a selection
    written by ``lorafuse library select --out FILE``, best first."""
    out: dict[str, str] = {}
    for item in items or []:
        if item.startswith("@"):
            from lorafuse.library import read_selection

            chosen = {name: str(path) for name, path in read_selection(item[1:]).items()}
            for name in chosen:
                if name in out:
                    raise typer.BadParameter(f"{what}: the name {name!r} is given twice")
            out |= chosen
            continue
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"{what} takes NAME=DIR, got {item!r}")
        if name in out:
            raise typer.BadParameter(f"{what}: the name {name!r} is given twice")
        out[name] = path
    return out


def fuse(
    base: Annotated[Path, typer.Option(help="Base model folder (AutoModelForCausalLM).", callback=FOLDER)],
    lora: Annotated[
        list[str], typer.Option(help="NAME=DIR of a PEFT LoRA, or @selection.json; repeat, task LoRA last.")
    ],
    train: Annotated[
        Path,
        typer.Option(
            help=f"Training examples: {ROWS_HELP}",
            callback=DATA,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output fusion folder.")],
    dev: Annotated[
        Path | None,
        typer.Option(help="Dev examples: the checkpoint with the best dev loss is kept.", callback=DATA),
    ] = None,
    chat: Annotated[bool, typer.Option(help=CHAT_HELP)] = False,
    gradient_checkpointing: GradientCheckpointing = False,
    method: Annotated[
        str,
        typer.Option(
            help="lora-flow | cat-weights (learned CAT; 'cat' also accepted) | lorahub | average.",
            callback=registry_choice(_fusion_methods),
        ),
    ] = "lora-flow",
    epochs: Annotated[float, typer.Option(help="Passes over the training examples.", callback=POSITIVE)] = 5,
    lr: Annotated[
        float | None,
        typer.Option(help="Learning rate [default: 1e-3 lora-flow, 1e-2 cat-weights].", callback=POSITIVE),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Examples per step (over all processes).", callback=COUNT)
    ] = 4,
    granularity: Annotated[
        str,
        typer.Option(
            help="lora-flow gates: layer | module | step.", callback=choice(("layer", "module", "step"))
        ),
    ] = "layer",
    bias_in_softmax: Annotated[bool, typer.Option(help="Ablation: w = softmax(Wx/T + b).")] = False,
    temperature: Annotated[float, typer.Option(help="Gate softmax temperature T.", callback=POSITIVE)] = 1.0,
    budget: Annotated[
        int,
        typer.Option(
            help="lorahub: loss evaluations of the search (the paper's 40 fits about 20 LoRAs; "
            "give at least the number of LoRAs + 2 for more).",
            callback=COUNT,
        ),
    ] = 40,
    seed: Annotated[int, typer.Option(help="Seed of the sampler and the search.", callback=SEED)] = 0,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint folder: resume from it after an interruption.")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer folder [default: the base's].", callback=FOLDER)
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.", callback=DTYPE)] = "float32",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps.", callback=DEVICE)] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
) -> None:
    """Learn how to combine existing LoRAs for a new task from a few examples (base and LoRAs frozen).

    lora-flow trains LoRA-Flow's per-layer gates (per-token weights); cat learns one softmax
    weight per LoRA per module (LoRA Soups); lorahub searches one weight per LoRA with nevergrad;
    average uses 1/k. Runs under `accelerate launch` on several processes unchanged.

    Example:

      lorafuse fuse --base world/base --lora zorb=world/loras/lang_zorb --lora math=world/loras/math
        --train data/math_zorb/train.jsonl --dev data/math_zorb/dev.jsonl --out fusions/math_zorb
    """
    from dataclasses import replace

    from lorafuse.fusion import FUSION_METHODS, FuseSettings, save_fusion
    from lorafuse.fusion import fuse as run_fuse
    from lorafuse.fusion.api import FLOW_TRAIN
    from lorafuse.fusion.lorahub import LoraHubConfig

    sources: dict[str, str | Path | None] = {
        "--base": base,
        "--train": train,
        "--dev": dev,
        "--tokenizer": tokenizer,
    }
    sources |= {f"--lora {name}": path for name, path in pairs(lora, "--lora").items()}
    check_out(out, sources, force=force)
    loras = pairs(lora, "--lora")
    if not loras:
        raise typer.BadParameter("give at least one --lora NAME=DIR")
    train_rows = read_examples(train, "--train", typer.BadParameter)
    dev_rows = read_examples(dev, "--dev", typer.BadParameter) if dev else None
    model, tok = load_base(base, tokenizer, dtype, device)
    train_config = FUSION_METHODS[method].default_train or FLOW_TRAIN
    train_config = replace(
        train_config,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr or train_config.lr,
        gradient_checkpointing=gradient_checkpointing,
    )
    settings = FuseSettings(
        chat=chat,
        method=method,  # type: ignore[arg-type]
        train=train_config,
        granularity=granularity,  # type: ignore[arg-type]
        temperature=temperature,
        bias_in_softmax=bias_in_softmax,
        lorahub=LoraHubConfig(budget=budget, seed=seed),
        seed=seed,
    )
    fusion = run_fuse(model, tok, loras, train_rows, dev_rows, settings, checkpoint_dir=checkpoint)
    fusion.info["tokenizer"] = str((tokenizer or base).resolve())
    from lorafuse.train.loop import process_state

    if process_state().is_main_process:
        save_fusion(fusion, out, inputs=sources)
        if fusion.gate is not None:
            g = fusion.gate
            typer.echo(
                f"gate parameters: {fusion.num_params:,} = {g.num_gates} gates × ({g.hidden_size} hidden × "
                f"{g.k} LoRAs + {g.k} bias)"
            )
        result = fusion.info.get("result", {})
        if result.get("best_dev_loss") is not None:
            typer.echo(f"best dev loss {result['best_dev_loss']:.4f} at step {result['best_step']}")
        if not fusion.dynamic:
            typer.echo(
                "weights: "
                + ", ".join(
                    f"{n} {float(w):.3f}"
                    for n, w in zip(fusion.lora_names, fusion.tensors["weights"], strict=True)
                )
            )
        typer.echo(f"wrote {out} ({fusion.method}, {fusion.k} LoRAs)")


def train_lora(
    base: Annotated[Path, typer.Option(help="Base model folder (AutoModelForCausalLM).", callback=FOLDER)],
    train: Annotated[
        Path,
        typer.Option(
            help=f"Training examples: {ROWS_HELP}",
            callback=DATA,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output PEFT adapter folder.")],
    dev: Annotated[
        Path | None,
        typer.Option(help="Dev examples: the parameters with the best dev loss are kept.", callback=DATA),
    ] = None,
    chat: Annotated[bool, typer.Option(help=CHAT_HELP)] = False,
    gradient_checkpointing: GradientCheckpointing = False,
    rank: Annotated[int, typer.Option(help="LoRA rank r.", callback=COUNT)] = 16,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scale alpha / r).", callback=POSITIVE)] = 32.0,
    target_modules: Annotated[
        str,
        typer.Option(
            help="Comma-separated module names to adapt (q_proj,v_proj,...), or all-linear: every "
            "linear layer but the output head."
        ),
    ] = "all-linear",
    epochs: Annotated[float, typer.Option(help="Passes over the training examples.", callback=POSITIVE)] = 5,
    lr: Annotated[float, typer.Option(help="Peak learning rate.", callback=POSITIVE)] = 4e-3,
    batch_size: Annotated[
        int, typer.Option(help="Examples per step (over all processes).", callback=COUNT)
    ] = 4,
    seed: Annotated[
        int, typer.Option(help="Seed of the LoRA's initialisation and the sampler.", callback=SEED)
    ] = 0,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer folder [default: the base's].", callback=FOLDER)
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.", callback=DTYPE)] = "float32",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps.", callback=DEVICE)] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
) -> None:
    """Train a fresh PEFT LoRA on the same examples as `fuse` (the recycling study's control).

    Every learned composition should be compared with a new LoRA trained on the same few
    examples: this is that LoRA, trained with the same loop, data rows and loss mask as `fuse`
    (LoRA-Flow's schedule with lr 4e-3, no weight decay). The output is a plain PEFT adapter
    folder (PeftModel.from_pretrained, `lorafuse serve` and vLLM load it), with lorafuse.json
    beside it recording the seed, settings, losses and versions.

    Example:

      lorafuse train-lora --base world/base --train data/math_zorb/train.jsonl
        --dev data/math_zorb/dev.jsonl --out loras/fresh_math_zorb
    """
    from dataclasses import asdict, replace

    from lorafuse._data import encode_rows
    from lorafuse._io import atomic_output_dir, versions, write_json
    from lorafuse.fusion import fit_fresh_lora
    from lorafuse.fusion.api import FRESH_TRAIN, _pad_id
    from lorafuse.train.loop import process_state

    sources: dict[str, str | Path | None] = {
        "--base": base,
        "--train": train,
        "--dev": dev,
        "--tokenizer": tokenizer,
    }
    check_out(out, sources, force=force)
    targets: str | list[str] = target_modules.strip()
    if targets != "all-linear":
        targets = [t.strip() for t in target_modules.split(",") if t.strip()]
        if not targets:
            raise typer.BadParameter("--target-modules: give module names (q_proj,v_proj) or all-linear")
    train_rows = read_examples(train, "--train", typer.BadParameter)
    dev_rows = read_examples(dev, "--dev", typer.BadParameter) if dev else None
    model, tok = load_base(base, tokenizer, dtype, device)
    train_data = encode_rows(tok, train_rows, chat=chat, source="--train")
    dev_data = encode_rows(tok, dev_rows, chat=chat, source="--dev") if dev_rows else None
    config = replace(
        FRESH_TRAIN,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        gradient_checkpointing=gradient_checkpointing,
    )
    peft_model, result = fit_fresh_lora(
        model,
        train_data,
        dev_data,
        config,
        pad_id=_pad_id(tok),
        rank=rank,
        alpha=alpha,
        target_modules=targets,
        copy_model=False,
    )
    if not process_state().is_main_process:
        return
    tail = result.losses[-10:]
    record = {
        "control": "fresh LoRA",
        "base_model": str(base.resolve()),
        "tokenizer": str((tokenizer or base).resolve()),
        "chat": chat or any("messages" in row for row in train_rows),
        "examples": {"train": len(train_data), "dev": len(dev_data or [])},
        "seed": seed,
        "rank": rank,
        "alpha": alpha,
        "target_modules": targets,
        "train": asdict(config),
        "result": {
            "steps": len(result.losses),
            "final_train_loss": round(sum(tail) / max(1, len(tail)), 5),
            "dev_losses": result.dev,
            "best_step": result.best_step,
            "best_dev_loss": result.best_dev_loss,
        },
        "versions": versions(),
    }
    with atomic_output_dir(out, overwrite=force, inputs=sources) as tmp:
        peft_model.save_pretrained(str(tmp))
        write_json(record, tmp / "lorafuse.json")
    best = f"; best dev loss {result.best_dev_loss:.4f} at step {result.best_step}" if dev_data else ""
    typer.echo(
        f"wrote {out} (rank {rank}, {len(result.losses)} steps, final loss "
        f"{record['result']['final_train_loss']:.4f}{best})"
    )


def attached(
    base: Path | None,
    fusion_dir: Path,
    lora: list[str] | None,
    tokenizer: Path | None,
    dtype: str,
    device: str,
):  # type: ignore[no-untyped-def]
    from lorafuse.fusion import load_fusion

    fusion = load_fusion(fusion_dir)
    base = base or (Path(fusion.info["base_model"]) if fusion.info.get("base_model") else None)
    if base is None:
        raise typer.BadParameter("the fusion does not record its base model; pass --base DIR")
    if tokenizer is None and fusion.info.get("tokenizer"):
        tokenizer = Path(fusion.info["tokenizer"])
        tokenizer = tokenizer if (tokenizer / "tokenizer_config.json").is_file() else None
    model, tok = load_base(base, tokenizer, dtype, device)
    handle = fusion.attach(model, fusion.load_loras(pairs(lora, "--lora")))
    return fusion, model, tok, handle


def generate(
    fusion: Annotated[Path, typer.Option(help="A fusion folder (lorafuse fuse --out).", callback=FOLDER)],
    prompt: Annotated[list[str], typer.Option(help="Prompt text; repeat for a batch.")],
    base: Annotated[
        Path | None,
        typer.Option(help="Base model folder [default: the one recorded in the fusion].", callback=FOLDER),
    ] = None,
    lora: Annotated[
        list[str] | None, typer.Option(help="NAME=DIR: where a LoRA of the fusion now lives.")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(help="Tokens to generate at most (capped at the model's context).", callback=COUNT)
    ] = 64,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer folder [default: recorded / the base's].", callback=FOLDER)
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.", callback=DTYPE)] = "float32",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps.", callback=DEVICE)] = "auto",
) -> None:
    """Generate greedily with a saved fusion attached (per-token gates, KV cache on).

    The fusion's LoRAs are loaded from their recorded paths and checked against their SHA-256.
    A fusion trained on chat data (`{"messages"}` rows or `fuse --chat`) gets each prompt as a
    user turn in the tokenizer's chat template.
    """
    from lorafuse.eval import generate as run_generate

    loaded, model, tok, _ = attached(base, fusion, lora, tokenizer, dtype, device)
    chat = bool(loaded.info.get("chat")) and bool(getattr(tok, "chat_template", None))
    for text in run_generate(model, tok, prompt, max_new_tokens=max_new_tokens, chat=chat):
        typer.echo(text)


def register(app: typer.Typer) -> None:
    app.command()(fuse)
    app.command("train-lora")(train_lora)
    app.command()(generate)
