"""``lorafuse route ...``: thin calls into route/ and fusion/instance."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorafuse._checks import InvalidValueError, check_number
from lorafuse.cli.loading import load_model, load_tokenizer
from lorafuse.cli.options import (
    CHAT_HELP,
    COUNT,
    DATA,
    FILE,
    FOLDER,
    NON_NEGATIVE,
    POSITIVE,
    ROWS_HELP,
    SEED,
    GradientCheckpointing,
    check_out,
    choice,
    names_of,
    read_examples,
    read_text,
    world_tasks,
)

DATA_HELP = f"Training rows (repeatable): {ROWS_HELP}"


def _is_chat(chat: bool, rows: list[dict[str, Any]]) -> bool:
    """Whether training saw chat-rendered rows (so generation renders prompts the same way)."""
    return chat or any("messages" in row for row in rows)


route_app = typer.Typer(
    help="Routing among LoRAs: mixtures of LoRA experts (softmax, ReMix), instance-level mixing, Arrow.",
    no_args_is_help=True,
)


def _world_paths(base: Path | None, tokenizer: Path | None) -> tuple[Path, Path, Path | None]:
    """``--base``/``--tokenizer`` or, when no base is given, the default skill world's."""
    if base is not None:
        return base, tokenizer or base, None
    from lorafuse.skillworld import build_world

    root = build_world()
    return root / "base", tokenizer or root / "tokenizer", root


def _load(base: Path, tokenizer: Path) -> tuple[Any, Any]:
    """The tokenizer and the float32 base model; a folder that holds neither is one line."""
    if not (base / "config.json").is_file():
        raise InvalidValueError(f"--base {base}: no config.json; expected a HuggingFace model folder")
    if not any((tokenizer / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        raise InvalidValueError(
            f"--tokenizer {tokenizer}: no tokenizer (tokenizer_config.json) in it; pass --tokenizer DIR"
        )

    return load_tokenizer(tokenizer), load_model(base)


def _named_loras(specs: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` or ``DIR`` (named after the folder)."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        folder = Path(path) if sep else Path(spec)
        out[name if sep else folder.name] = folder
    return out


@route_app.command("train")
def route_train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output mixture folder.")],
    router: Annotated[
        str, typer.Option(help="softmax | remix.", callback=choice(("softmax", "remix")))
    ] = "remix",
    experts: Annotated[int, typer.Option(help="Number of new LoRA experts n.", callback=COUNT)] = 8,
    top_k: Annotated[
        int, typer.Option("--top-k", help="Experts per token k (≤ --experts).", callback=COUNT)
    ] = 2,
    rank: Annotated[int, typer.Option(help="Rank of each expert.", callback=COUNT)] = 16,
    alpha: Annotated[float, typer.Option(help="LoRA alpha of each expert.", callback=POSITIVE)] = 32.0,
    samples: Annotated[
        int, typer.Option(help="ReMix: sampled selections per example (M).", callback=COUNT)
    ] = 4,
    balance: Annotated[
        float, typer.Option(help="softmax: load-balancing loss weight.", callback=NON_NEGATIVE)
    ] = 0.01,
    data: Annotated[
        list[Path] | None,
        typer.Option("--data", help=DATA_HELP, callback=DATA),
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Skill-world tasks to mix when no --data [default: skills + pool].",
            callback=names_of(world_tasks),
        ),
    ] = None,
    base: Annotated[
        Path | None, typer.Option(help="HF base model folder [default: the skill world's].", callback=FOLDER)
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer folder [default: --base].", callback=FOLDER)
    ] = None,
    steps: Annotated[int, typer.Option(help="Training steps.", callback=COUNT)] = 300,
    batch_size: Annotated[int, typer.Option(help="Examples per step.", callback=COUNT)] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate.", callback=POSITIVE)] = 4e-3,
    seed: Annotated[
        int, typer.Option(help="Seed of the experts, router, sampler and data order.", callback=SEED)
    ] = 0,
    chat: Annotated[bool, typer.Option(help=CHAT_HELP)] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
) -> None:
    """Train n new LoRA experts and a per-layer top-k router on a frozen base; save the mixture.

    --data takes {"messages"}, {"prompt", "completion"} or {"text"} rows (as `lorafuse fuse`).

    Example: lorafuse route train --router remix --experts 8 --top-k 2 --out mix/remix
    """
    import torch

    from lorafuse._data import encode_rows
    from lorafuse.route import MixtureConfig, train_mixture
    from lorafuse.train.loop import TrainConfig

    check_number(top_k, f"--top-k (experts per token, of --experts {experts})", high=experts)
    sources: list[tuple[str, Path | None]] = [("--base", base), ("--tokenizer", tokenizer)]
    sources += [("--data", path) for path in data or []]
    check_out(out, sources, force=force)
    torch.manual_seed(seed)
    base_dir, tok_dir, world = _world_paths(base, tokenizer)
    sources.append(("the skill world", world))
    check_out(out, sources, force=force)
    rows = _training_rows(data, tasks, world)
    tok, model = _load(base_dir, tok_dir)
    config = MixtureConfig(
        router=router,
        experts=experts,
        top_k=top_k,
        rank=rank,
        alpha=alpha,
        samples=samples,
        balance=balance,
        seed=seed,
    )
    train = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    mixture, losses = train_mixture(
        model,
        encode_rows(tok, rows, chat=chat, source="--data"),
        config,
        train,
        pad_id=tok.pad_token_id,
        base_model=str(base_dir),
    )
    extra = {
        "tokenizer": str(tok_dir),
        "train": {"steps": steps, "batch_size": batch_size, "lr": lr},
        "chat": _is_chat(chat, rows),
    }
    mixture.save(out, extra | {"examples": len(rows)}, inputs=sources)
    tail = losses[-20:]
    typer.echo(
        f"wrote {out} ({router}, {experts} experts, top-{top_k}; final loss {sum(tail) / len(tail):.4f})"
    )


def _training_rows(data: list[Path] | None, tasks: str | None, world: Path | None) -> list[dict[str, Any]]:
    from lorafuse.skillworld.data import read_jsonl
    from lorafuse.studies.route import ROUTE_TASKS

    if data:
        return [r for path in data for r in read_examples(path, "--data")]
    if world is None:
        raise typer.BadParameter("--data is required with --base")
    names = tasks.split(",") if tasks else ROUTE_TASKS
    return [r for t in names for r in read_jsonl(world / "data" / t / "train.jsonl")]


@route_app.command("train-encoder")
def route_train_encoder(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output encoder folder.")],
    lora: Annotated[
        list[str] | None,
        typer.Option("--lora", help="NAME=DIR or DIR: the basis [default: world skills + pool]."),
    ] = None,
    activation: Annotated[
        str, typer.Option(help="softmax | tanh.", callback=choice(("softmax", "tanh")))
    ] = "softmax",
    top_k: Annotated[
        int | None,
        typer.Option("--top-k", help="Keep the top-k coefficients [default: all].", callback=COUNT),
    ] = None,
    dim: Annotated[int, typer.Option(help="Query/key width of the encoder.", callback=COUNT)] = 64,
    data: Annotated[list[Path] | None, typer.Option("--data", help=DATA_HELP, callback=DATA)] = None,
    tasks: Annotated[
        str | None, typer.Option(help="Skill-world tasks when no --data.", callback=names_of(world_tasks))
    ] = None,
    base: Annotated[
        Path | None, typer.Option(help="HF base folder [default: the skill world's].", callback=FOLDER)
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer folder [default: --base].", callback=FOLDER)
    ] = None,
    steps: Annotated[int, typer.Option(help="Training steps.", callback=COUNT)] = 300,
    batch_size: Annotated[int, typer.Option(help="Examples per step.", callback=COUNT)] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate.", callback=POSITIVE)] = 1e-2,
    seed: Annotated[int, typer.Option(help="Seed.", callback=SEED)] = 0,
    chat: Annotated[bool, typer.Option(help=CHAT_HELP)] = False,
    gradient_checkpointing: GradientCheckpointing = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
) -> None:
    """Train an instance-level encoder: pooled prompt → coefficients over a basis of LoRAs (LoRWeB).

    --data takes {"messages"}, {"prompt", "completion"} or {"text"} rows (as `lorafuse fuse`); the
    prompt the encoder pools is every token without a loss (for chat rows: the system and user
    turns and the role headers). An encoder trained on chat rows records it, and `route
    generate` then renders each prompt as a user turn with the chat template.

    Example: lorafuse route train-encoder --top-k 2 --out enc/world
    """
    from lorafuse._data import encode_rows
    from lorafuse.adapters import load_lora
    from lorafuse.fusion.instance import EncoderConfig, train_encoder
    from lorafuse.studies.route import ROUTE_TASKS
    from lorafuse.train.loop import TrainConfig

    sources: list[tuple[str, Path | None]] = [("--base", base), ("--tokenizer", tokenizer)]
    sources += [("--data", path) for path in data or []]
    sources += [(f"--lora {name}", path) for name, path in _named_loras(lora or []).items()]
    check_out(out, sources, force=force)
    base_dir, tok_dir, world = _world_paths(base, tokenizer)
    if lora:
        folders = _named_loras(lora)
    elif world is not None:
        folders = {name: world / "loras" / name for name in ROUTE_TASKS}
    else:
        raise typer.BadParameter("--lora is required with --base")
    if top_k is not None:
        check_number(top_k, f"--top-k (coefficients kept, of {len(folders)} LoRAs)", high=len(folders))
    sources.append(("the skill world", world))
    check_out(out, sources, force=force)
    rows = _training_rows(data, tasks, world)
    tok, model = _load(base_dir, tok_dir)
    basis = {name: load_lora(path) for name, path in folders.items()}
    config = EncoderConfig(activation=activation, top_k=top_k, dim=dim, seed=seed)
    train = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        gradient_checkpointing=gradient_checkpointing,
    )
    encoded = encode_rows(tok, rows, chat=chat, source="--data")
    mixing, losses = train_encoder(model, basis, encoded, config, train, pad_id=tok.pad_token_id)
    paths = {n: str(p.resolve()) for n, p in folders.items()}
    extra = {"tokenizer": str(tok_dir), "chat": _is_chat(chat, rows), "examples": len(rows)}
    mixing.save(out, paths, base_model=str(base_dir), extra=extra, inputs=sources)
    tail = losses[-20:]
    typer.echo(f"wrote {out} (basis of {len(basis)} LoRAs; final loss {sum(tail) / len(tail):.4f})")


@route_app.command("generate")
def route_generate(
    prompts: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text (repeatable).")],
    mixture: Annotated[
        Path | None,
        typer.Option(help="A mixture folder (route train) or an instance-encoder folder.", callback=FOLDER),
    ] = None,
    lora: Annotated[
        list[str] | None, typer.Option("--lora", help="NAME=DIR or DIR: LoRAs for --arrow / --mode.")
    ] = None,
    arrow: Annotated[bool, typer.Option("--arrow", help="Route the --lora LoRAs with Arrow.")] = False,
    top_k: Annotated[
        int | None,
        typer.Option("--top-k", help="Arrow: LoRAs per token [default: 3, or all if fewer].", callback=COUNT),
    ] = None,
    temperature: Annotated[float, typer.Option(help="Arrow: softmax temperature.", callback=POSITIVE)] = 1.0,
    mode: Annotated[str | None, typer.Option(help="Mode switch: the mode (LoRA set) to use.")] = None,
    modes: Annotated[
        Path | None, typer.Option(help="JSON or YAML file {mode: [LoRA names]} for --mode.", callback=FILE)
    ] = None,
    base: Annotated[
        Path | None, typer.Option(help="HF base folder [default: recorded / the world's].", callback=FOLDER)
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer folder [default: --base].", callback=FOLDER)
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(help="Tokens to generate (capped at the model's context).", callback=COUNT)
    ] = 48,
) -> None:
    """Greedy generation (KV cache on) with a trained mixture, an instance encoder, Arrow or a mode.

    A mixture or encoder trained on chat rows gets each prompt as a user turn in the tokenizer's
    chat template.

    Examples:

      lorafuse route generate --mixture mix/remix -p "question : ... answer :"

      lorafuse route generate --arrow --lora math=loras/math --lora list=loras/list -p "..."

      lorafuse route generate --mode maths --modes modes.yaml --lora loras/math -p "..."
    """
    import yaml

    from lorafuse.adapters import load_lora
    from lorafuse.eval import generate
    from lorafuse.fusion.instance import InstanceMixing, mode_weights, read_encoder
    from lorafuse.route import ArrowSource, Mixture
    from lorafuse.route.mixture import read_mixture_meta
    from lorafuse.runtime import attach

    chosen = sum([mixture is not None, arrow, mode is not None])
    if chosen != 1:
        raise typer.BadParameter("give exactly one of --mixture DIR, --arrow, --mode NAME")
    folders = _named_loras(lora or [])
    if mixture is None and not folders:
        raise typer.BadParameter("--arrow and --mode need at least one --lora")
    if arrow and top_k is not None:
        check_number(top_k, f"--top-k (LoRAs per token, of the {len(folders)} --lora)", high=len(folders))
    table: dict[str, Any] = {}
    if mode is not None:
        if modes is None:
            raise typer.BadParameter("--mode needs --modes FILE")
        try:
            table = yaml.safe_load(read_text(modes, "--modes"))
        except yaml.YAMLError as exc:
            raise InvalidValueError(f"--modes {modes}: not YAML or JSON ({type(exc).__name__})") from None
        if not isinstance(table, dict):
            raise InvalidValueError(f"--modes {modes}: expected a mapping {{mode: [LoRA names]}}")
    meta: dict[str, Any] = {}
    encoder_meta: dict[str, Any] | None = None
    if mixture is not None and (mixture / "mixture.json").is_file():
        meta = read_mixture_meta(mixture)  # validated, recorded paths resolved
    elif mixture is not None:
        encoder_meta, encoder = read_encoder(mixture)
        meta = encoder_meta
    if base is None and meta.get("base_model") and Path(meta["base_model"]).is_dir():
        base = Path(meta["base_model"])
        recorded_tok = meta.get("tokenizer")
        if tokenizer is None and recorded_tok and Path(recorded_tok).is_dir():
            tokenizer = Path(recorded_tok)
    base_dir, tok_dir, _ = _world_paths(base, tokenizer)
    tok, model = _load(base_dir, tok_dir)
    if mixture is not None and encoder_meta is None:
        Mixture.load(mixture, model)
    elif mixture is not None and encoder_meta is not None:
        basis = {name: load_lora(path) for name, path in encoder_meta["basis"].items()}
        InstanceMixing(model, basis, encoder)
    else:
        handle = attach(model, {name: load_lora(path) for name, path in folders.items()})
        if arrow:
            k = top_k if top_k is not None else min(3, len(folders))
            handle.set_source(ArrowSource(handle, model, top_k=k, temperature=temperature))
        else:
            assert mode is not None
            handle.set_weights(mode_weights(handle.names, table, mode))
    chat = bool(meta.get("chat")) and bool(getattr(tok, "chat_template", None))
    for prompt, text in zip(
        prompts, generate(model, tok, prompts, max_new_tokens=max_new_tokens, chat=chat), strict=True
    ):
        typer.echo(f"{prompt} → {text}")


def register(app: typer.Typer) -> None:
    """Add ``route`` to the main CLI."""
    app.add_typer(route_app, name="route")
