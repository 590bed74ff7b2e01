"""``lorafuse serve``: an OpenAI-compatible server for every adapter under one folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer


def serve(
    base: Annotated[Path | None, typer.Option(help="Base model folder (default: the skill world's).")] = None,
    adapters: Annotated[
        Path | None,
        typer.Option(
            help="Folder whose sub-folders are served: PEFT adapters, fusions (lorafuse fuse), compressed "
            "deltas (lorafuse compress); each sub-folder's name is its model name. Default: world LoRAs."
        ),
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer folder (default: --base or ../tokenizer).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Require `Authorization: Bearer KEY` on every route but /health (or $LORAFUSE_API_KEY)."
        ),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="Name of the base model in the API (default: its folder).")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Rows decoded together.")] = 32,
    max_queue: Annotated[int, typer.Option(help="Waiting requests before 429.")] = 256,
    max_loaded: Annotated[
        int, typer.Option(help="Adapters kept in memory (least recently used evicted).")
    ] = 64,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt accepted.")] = 2048,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens accepted.")] = 512,
    allow_negative_weights: Annotated[
        bool, typer.Option(help="Allow negative weights in `compose` (task arithmetic).")
    ] = False,
    dtype: Annotated[str, typer.Option(help="Model dtype: float32, bfloat16, float16.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, or auto.")] = "auto",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve many adapters, weighted compositions, fusions and compressed deltas from one base model.

    OpenAI-compatible routes: POST /v1/completions, POST /v1/chat/completions (streaming with
    "stream": true), GET /v1/models, GET /health, GET /metrics (Prometheus). Name an adapter in
    "model", or set "model" to the base and "compose" to {"math": 0.7, "zh": 0.5} or a fusion name.
    Requests for different adapters are batched together, each row with its own adapter.
    """
    import torch

    from lorafuse.cli_fuse import load_base
    from lorafuse.serve import Limits, Server, ServeSettings, WeightLimits

    if base is None:
        from lorafuse.skillworld import build_world

        root = build_world()
        base, tokenizer = root / "base", tokenizer or root / "tokenizer"
        adapters = adapters or root / "loras"
    if adapters is None or not adapters.is_dir():
        raise typer.BadParameter(f"--adapters {adapters}: no such folder")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_base(base, tokenizer, dtype, device)
    settings = ServeSettings(
        base_name=model_name or base.resolve().name,
        api_key=api_key or os.environ.get("LORAFUSE_API_KEY") or None,
        max_batch=max_batch,
        max_queue=max_queue,
        max_loaded=max_loaded,
        limits=Limits(max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens),
        weights=WeightLimits(allow_negative=allow_negative_weights),
    )
    server = Server(model, tok, adapters, settings)
    names = [e.name for e in server.registry.entries()]
    typer.echo(f"serving {settings.base_name!r} + {len(names)} adapters/fusions/deltas from {adapters}")
    typer.echo(f"  {', '.join(names[:12])}{' …' if len(names) > 12 else ''}")
    typer.echo(
        f"  OpenAI base URL: http://{host}:{port}/v1" + ("  (API key required)" if settings.api_key else "")
    )
    server.run(host=host, port=port, log_level=log_level)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
