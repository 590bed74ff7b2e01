"""``lorafuse serve``: an OpenAI-compatible server for every adapter under one folder.

Every flag is checked before anything is loaded; a bad one is one ``error:`` line and exit 2.
"""

from __future__ import annotations

import os
import shlex
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer

from lorafuse._checks import InvalidValueError, check_number

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
ENGINES = ("builtin", "vllm")
VLLM_FLAGS = ("--vllm-url", "--vllm-model", "--vllm-max-lora-rank", "--vllm-cache", "--vllm-cache-mb")


def api_key_setting(flag: str | None, environ: Mapping[str, str]) -> str | None:
    """The API key: ``--api-key`` or else ``$LORAFUSE_API_KEY``; ``None`` when neither is set.
    An empty (or blank) key is refused rather than taken as "no key": it would serve every route
    without authentication, usually because a variable was unset."""
    if flag is not None:
        if not flag.strip():
            raise InvalidValueError(
                "--api-key is empty (an unset variable?); the server would run without authentication. "
                "Give a key, or leave out --api-key to serve without one"
            )
        return flag
    env = environ.get("LORAFUSE_API_KEY")
    if env is not None and not env.strip():
        raise InvalidValueError(
            "$LORAFUSE_API_KEY is set but empty; the server would run without authentication. "
            "Set a key, or unset the variable to serve without one"
        )
    return env


def check_listen(host: str, port: int) -> None:
    """Refuse a host or port that cannot be listened on (unknown address, port in use) before
    the model is loaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidValueError(f"--host {host!r}: not an address to listen on ({exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise InvalidValueError(
                f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})"
            ) from None


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
    threads: Annotated[
        int | None,
        typer.Option(
            help="Torch intra-op threads of the engine (the only thread running the model). "
            "Default: the cores this process may use, less one for the HTTP side."
        ),
    ] = None,
    shutdown_grace: Annotated[
        float, typer.Option(help="Seconds running requests get to finish on SIGTERM before cancelling.")
    ] = 5.0,
    dtype: Annotated[str, typer.Option(help="Model dtype: float32, bfloat16, float16.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, or auto.")] = "auto",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    engine: Annotated[
        str,
        typer.Option(
            help="builtin: lorafuse's engine (everything, on this machine). vllm: forward to a running vLLM "
            "server (--vllm-url); static adapters and compositions only."
        ),
    ] = "builtin",
    vllm_url: Annotated[
        str | None,
        typer.Option(
            help="With --engine vllm: the vLLM OpenAI server (e.g. http://127.0.0.1:8001), started with "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora."
        ),
    ] = None,
    vllm_model: Annotated[
        str | None, typer.Option(help="vLLM's name of the base model (default: the one it lists).")
    ] = None,
    vllm_max_lora_rank: Annotated[
        int, typer.Option(help="The --max-lora-rank vLLM runs with; larger adapters are refused (400).")
    ] = 16,
    vllm_cache: Annotated[
        Path | None,
        typer.Option(
            help="Folder of the adapters written for vLLM (it must read them at the same path). "
            "Default: $LORAFUSE_HOME/vllm-adapters."
        ),
    ] = None,
    vllm_cache_mb: Annotated[
        int, typer.Option(help="Size cap of --vllm-cache in MiB (least recently used adapters removed).")
    ] = 4096,
    vllm_launch: Annotated[
        bool,
        typer.Option(
            help="With --engine vllm: start vLLM's server (on 127.0.0.1, a free port) from --vllm-python, "
            "instead of --vllm-url; it stops with lorafuse."
        ),
    ] = False,
    vllm_python: Annotated[
        Path, typer.Option(help="The Python of vLLM's virtual environment, for --vllm-launch.")
    ] = Path(".venv-vllm/bin/python"),
    vllm_args: Annotated[
        str, typer.Option(help='More arguments for vLLM with --vllm-launch, e.g. "--dtype float32".')
    ] = "",
) -> None:
    """Serve many adapters, weighted compositions, fusions and compressed deltas from one base model.

    OpenAI-compatible routes: POST /v1/completions, POST /v1/chat/completions (streaming with
    "stream": true), GET /v1/models, GET /health, GET /metrics (Prometheus). Name an adapter in
    "model", or set "model" to the base and "compose" to {"math": 0.7, "zh": 0.5} or a fusion name.
    Requests for different adapters are batched together, each row with its own adapter.
    SIGTERM stops admitting, lets running requests finish (--shutdown-grace) and exits.
    """
    for flag, value, low in (
        ("--max-batch", max_batch, 1),
        ("--max-queue", max_queue, 1),
        ("--max-loaded", max_loaded, 1),
        ("--max-prompt-tokens", max_prompt_tokens, 1),
        ("--max-tokens", max_tokens, 1),
    ):
        check_number(value, flag, integer=True, low=low)
    check_number(port, "--port", integer=True, low=1, high=65535)
    if threads is not None:
        check_number(threads, "--threads", integer=True, low=1, high=4096)
    check_number(shutdown_grace, "--shutdown-grace", low=0, high=3600)
    if log_level.lower() not in LOG_LEVELS:
        raise InvalidValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    key = api_key_setting(api_key, os.environ)
    if vllm_launch:
        if engine != "vllm" or vllm_url is not None:
            raise InvalidValueError("--vllm-launch goes with --engine vllm and without --vllm-url")
        if not vllm_python.is_file():
            raise InvalidValueError(f"--vllm-python {vllm_python}: no such file (make venv-vllm builds it)")
        try:
            extra = shlex.split(vllm_args)
        except ValueError as exc:
            raise InvalidValueError(f"--vllm-args: {exc}") from None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            vllm_url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    url = check_engine(engine, vllm_url, vllm_max_lora_rank, vllm_cache_mb, vllm_cache)
    if adapters is not None and not adapters.is_dir():
        raise InvalidValueError(f"--adapters {adapters}: no such folder")
    check_listen(host, port)

    import torch

    from lorafuse.cli.loading import load_base
    from lorafuse.serve import Limits, Server, ServeSettings, WeightLimits

    if base is None:
        from lorafuse.skillworld import build_world

        root = build_world()
        base, tokenizer = root / "base", tokenizer or root / "tokenizer"
        adapters = adapters or root / "loras"
    if adapters is None or not adapters.is_dir():
        raise InvalidValueError(f"--adapters {adapters}: no such folder")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = ServeSettings(
        base_name=model_name or base.resolve().name,
        api_key=key,
        max_batch=max_batch,
        max_queue=max_queue,
        max_loaded=max_loaded,
        limits=Limits(
            max_prompt_tokens=max_prompt_tokens,
            max_tokens=max_tokens,
            default_max_tokens=min(Limits.default_max_tokens, max_tokens),
        ),
        weights=WeightLimits(allow_negative=allow_negative_weights),
        threads=threads,
        shutdown_grace=shutdown_grace,
    )
    if url is None:
        model, tok = load_base(base, tokenizer, dtype, device)
        server = Server(model, tok, adapters, settings)
    else:
        server = vllm_server(
            base,
            tokenizer,
            adapters,
            settings,
            url,
            vllm_model,
            vllm_max_lora_rank,
            vllm_cache,
            vllm_cache_mb,
        )
    names = [e.name for e in server.registry.entries()]
    typer.echo(f"serving {settings.base_name!r} + {len(names)} adapters/fusions/deltas from {adapters}")
    typer.echo(f"  {', '.join(names[:12])}{' …' if len(names) > 12 else ''}")
    refused = sorted(server.registry.not_servable())
    if refused:
        shown = ", ".join(refused[:12]) + (" …" if len(refused) > 12 else "")
        typer.echo(f"  not served ({len(refused)}, reasons in the warnings above): {shown}")
    typer.echo(f"  {server.startup_line}")
    typer.echo(
        f"  OpenAI base URL: http://{host}:{port}/v1" + ("  (API key required)" if settings.api_key else ""),
    )
    if vllm_launch:
        from lorafuse.serve.vllm_launch import launch_command, launched

        assert url is not None
        command = launch_command(
            vllm_python,
            base,
            tokenizer or (base if (base / "tokenizer_config.json").is_file() else base.parent / "tokenizer"),
            port=int(url.rsplit(":", 1)[1]),
            served_name=settings.base_name,
            max_lora_rank=vllm_max_lora_rank,
            max_loras=min(settings.max_loaded, 8),
            extra=extra,
        )
        log_file = Path(tempfile.gettempdir()) / f"lorafuse-vllm-{os.getpid()}.log"
        typer.echo(f"  starting vLLM (log: {log_file}): {shlex.join(command)}")
        try:
            with launched(command, url, log_file):
                typer.echo(f"  vLLM is up at {url}")
                server.run(host=host, port=port, log_level=log_level.lower())
        except RuntimeError as exc:
            raise InvalidValueError(str(exc)) from None
    else:
        server.run(host=host, port=port, log_level=log_level.lower())
    typer.echo("lorafuse serve: shut down")


def check_engine(
    engine: str, url: str | None, max_rank: int, cache_mb: int, cache: Path | None
) -> str | None:
    """The vLLM URL for ``--engine vllm`` (``None`` for the built-in engine); a bad flag is an
    :class:`InvalidValueError` (one ``error:`` line, exit 2)."""
    from lorafuse.cli.options import check_choice
    from lorafuse.serve.vllm import VLLM_MAX_RANKS, check_url

    check_choice(engine, "--engine", ENGINES)
    if engine == "builtin":
        if url is not None:
            raise InvalidValueError("--vllm-url is for --engine vllm; add --engine vllm or leave it out")
        return None
    if url is None:
        raise InvalidValueError(
            "--engine vllm needs --vllm-url URL: a running vLLM OpenAI server started with "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora"
        )
    try:
        url = check_url(url)
    except ValueError as exc:
        raise InvalidValueError(f"--vllm-url: {exc}") from None
    if max_rank not in VLLM_MAX_RANKS:
        raise InvalidValueError(
            f"--vllm-max-lora-rank must be one vLLM accepts ({', '.join(map(str, VLLM_MAX_RANKS))}), "
            f"got {max_rank}"
        )
    check_number(cache_mb, "--vllm-cache-mb", integer=True, low=1)
    if cache is not None and cache.exists() and not cache.is_dir():
        raise InvalidValueError(f"--vllm-cache {cache}: not a folder")
    return url


def vllm_server(  # type: ignore[no-untyped-def]
    base: Path,
    tokenizer: Path | None,
    adapters: Path,
    settings,
    url: str,
    model: str | None,
    max_rank: int,
    cache: Path | None,
    cache_mb: int,
):
    """A :class:`~lorafuse.serve.Server` forwarding to vLLM: the base's tokenizer and its config
    (the model on the ``meta`` device: nothing is loaded but layer names and shapes)."""
    from lorafuse._io import lorafuse_home
    from lorafuse.cli.loading import find_tokenizer, load_model_shapes, load_tokenizer
    from lorafuse.export import adapter_writer
    from lorafuse.serve import Server
    from lorafuse.serve.engine import vocabulary_size
    from lorafuse.serve.registry import Registry
    from lorafuse.serve.vllm import VllmBackend

    if not base.is_dir():
        raise InvalidValueError(f"--base {base}: no such folder")
    candidates = [tokenizer] if tokenizer else [base, base.parent / "tokenizer"]
    found = find_tokenizer(candidates, ("tokenizer_config.json",))
    if found is None:
        raise InvalidValueError(f"no tokenizer in {', '.join(map(str, candidates))}; pass --tokenizer DIR")
    tok = load_tokenizer(found)
    meta = load_model_shapes(base)
    config = meta.config
    backend = VllmBackend(
        url,
        tok,
        write=adapter_writer(Registry(adapters)),
        cache_dir=cache or lorafuse_home() / "vllm-adapters",
        max_length=int(getattr(config, "max_position_embeddings", 0) or 1 << 30),
        vocab_size=vocabulary_size(meta, tok),
        max_cache_bytes=cache_mb << 20,
        max_loaded=settings.max_loaded,
        max_lora_rank=max_rank,
        max_queue=settings.max_queue,
        model=model,
    )
    return Server(meta, tok, adapters, settings, backend=backend)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
