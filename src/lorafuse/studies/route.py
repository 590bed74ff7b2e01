"""Routing on the skill world: mixtures of LoRA experts vs. routing over the existing skill LoRAs.

The multi-skill mixture is the union of the training sets of the skill and pool tasks
(:data:`ROUTE_TASKS`). Every method activates the same number of LoRA ranks per token and module
(``top_k × rank``):

- ``softmax`` and ``remix``: ``experts`` new LoRA experts of rank ``rank`` trained with a router
  (top-k) on the mixture, one run per seed;
- ``encoder``: the instance-level encoder over the 10 existing skill/pool LoRAs (rank 16),
  coefficients over the top-k, trained on the same mixture, one run per seed;
- ``arrow``: training-free Arrow routing (top-k) over the same 10 LoRAs (deterministic, one run).

Scored per task (exact match %, first ``limit`` test examples, greedy, KV cache) and for routing
health per layer (effective experts, top share; routing weights on the same test examples,
teacher-forced, valid tokens; the encoder's are per sequence).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lorafuse._data import collate, encode_examples
from lorafuse.adapters import load_lora
from lorafuse.eval import evaluate
from lorafuse.fusion.instance import EncoderConfig, train_encoder
from lorafuse.route import ArrowSource, MixtureConfig, RoutingStats, train_mixture
from lorafuse.runtime import attach, detach
from lorafuse.skillworld.data import POOL, SKILLS, read_jsonl
from lorafuse.skillworld.evaluate import load_world
from lorafuse.train.loop import TrainConfig

ROUTE_TASKS = [*SKILLS, *POOL]
METHODS = ("softmax", "remix", "encoder", "arrow")


@dataclass(frozen=True)
class RouteStudySettings:
    experts: int = 8
    top_k: int = 2
    rank: int = 16
    alpha: float = 32.0
    steps: int = 300
    batch_size: int = 32
    lr: float = 4e-3
    samples: int = 4  # ReMix M
    balance: float = 0.01  # softmax load-balancing weight
    encoder_lr: float = 1e-2
    arrow_temperature: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2)
    limit: int = 100
    methods: tuple[str, ...] = METHODS


def _health(model: Any, tokenizer: Any, rows: list[dict[str, str]], attach_stats: Any) -> dict[str, Any]:
    """Run the rows teacher-forced with a :class:`RoutingStats` hooked in; returns its summary."""
    stats = RoutingStats()
    attach_stats(stats)
    encoded = encode_examples(tokenizer, rows)
    with torch.no_grad():
        for start in range(0, len(encoded), 64):
            batch = collate(encoded[start : start + 64], tokenizer.pad_token_id)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    attach_stats(None)
    return stats.summary()


def _score(model: Any, tokenizer: Any, tests: dict[str, list[dict[str, str]]]) -> dict[str, float]:
    return {t: round(evaluate(model, tokenizer, rows)["exact_match"], 1) for t, rows in tests.items()}


def route_study(
    root: Path,
    settings: RouteStudySettings,
    *,
    progress: bool = True,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``settings.methods`` on the world at ``root``; returns per-run accuracies, health, timings.

    ``on_run`` is called with the result so far after every run (to save partial results).
    """
    started = time.perf_counter()
    tokenizer, _ = load_world(root)
    rows = [r for t in ROUTE_TASKS for r in read_jsonl(root / "data" / t / "train.jsonl")]
    data = encode_examples(tokenizer, rows)
    tests = {t: read_jsonl(root / "data" / t / "test.jsonl")[: settings.limit] for t in ROUTE_TASKS}
    health_rows = [r for t in ROUTE_TASKS for r in tests[t]]
    basis_paths = {name: root / "loras" / name for name in ROUTE_TASKS}
    needs_basis = {"encoder", "arrow"} & set(settings.methods)
    basis = {name: load_lora(path) for name, path in basis_paths.items()} if needs_basis else {}
    pad = tokenizer.pad_token_id
    runs: list[dict[str, Any]] = []
    trained = [m for m in settings.methods if m != "arrow"]
    total = len(trained) * len(settings.seeds) + ("arrow" in settings.methods)
    bar = tqdm(total=total, desc="route study", unit="run", disable=not progress)

    def result() -> dict[str, Any]:
        return {
            "metric": "exact match (%) on the first `limit` test examples of each task",
            "tasks": ROUTE_TASKS,
            "settings": {
                **asdict(settings),
                "seeds": list(settings.seeds),
                "methods": list(settings.methods),
            },
            "activated_ranks_per_module": settings.top_k * settings.rank,
            "runs": runs,
            "seconds": round(time.perf_counter() - started, 1),
        }

    def done() -> None:
        bar.update()
        if on_run is not None:
            on_run(result())

    for seed in settings.seeds:
        train = TrainConfig(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr, seed=seed)
        for router in [m for m in ("softmax", "remix") if m in settings.methods]:
            t0 = time.perf_counter()
            _, model = load_world(root)
            config = MixtureConfig(
                router=router,
                experts=settings.experts,
                top_k=settings.top_k,
                rank=settings.rank,
                alpha=settings.alpha,
                samples=settings.samples,
                balance=settings.balance,
                seed=seed,
            )
            mixture, losses = train_mixture(model, data, config, train, pad_id=pad, progress=progress)
            train_s = time.perf_counter() - t0

            def hook(stats: RoutingStats | None, mixture: Any = mixture) -> None:
                mixture.source.stats = stats

            runs.append(
                {
                    "method": router,
                    "seed": seed,
                    "accuracy": _score(model, tokenizer, tests),
                    "health": _health(model, tokenizer, health_rows, hook),
                    "final_loss": round(statistics.fmean(losses[-20:]), 4),
                    "train_seconds": round(train_s, 1),
                    "trainable_params": sum(p.numel() for p in mixture.parameters()),
                }
            )
            mixture.freeze()
            mixture.remove()
            done()

        if "encoder" not in settings.methods:
            continue
        t0 = time.perf_counter()
        _, model = load_world(root)
        enc_train = TrainConfig(
            steps=settings.steps, batch_size=settings.batch_size, lr=settings.encoder_lr, seed=seed
        )
        enc_config = EncoderConfig(activation="softmax", top_k=settings.top_k, seed=seed)
        mixing, losses = train_encoder(
            model, basis, data, enc_config, enc_train, pad_id=pad, progress=progress
        )
        train_s = time.perf_counter() - t0
        coefficients: list[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, len(health_rows), 64):
                batch = collate(encode_examples(tokenizer, health_rows[start : start + 64]), pad)
                model(**batch)
                assert mixing.source.coefficients is not None
                coefficients.append(mixing.source.coefficients)
        stats = RoutingStats()
        coeff = torch.cat(coefficients)[:, None, :]  # (N, 1, k): one routing per sequence
        for layer in range(int(model.config.num_hidden_layers)):
            stats(layer, coeff, torch.ones(coeff.shape[:2]))
        runs.append(
            {
                "method": "encoder",
                "seed": seed,
                "accuracy": _score(model, tokenizer, tests),
                "health": stats.summary(),
                "final_loss": round(statistics.fmean(losses[-20:]), 4),
                "train_seconds": round(train_s, 1),
                "trainable_params": sum(p.numel() for p in mixing.encoder.parameters()),
                "basis": mixing.names,
            }
        )
        mixing.remove()
        done()

    if "arrow" in settings.methods:
        runs.append(_arrow_run(root, basis, tests, health_rows, settings))
        done()
    bar.close()
    return result()


def _arrow_run(
    root: Path,
    basis: dict[str, Any],
    tests: dict[str, list[dict[str, str]]],
    health_rows: list[dict[str, str]],
    settings: RouteStudySettings,
) -> dict[str, Any]:
    tokenizer, model = load_world(root)
    handle = attach(model, basis)
    source = ArrowSource(handle, model, top_k=settings.top_k, temperature=settings.arrow_temperature)
    handle.set_source(source)

    def arrow_hook(stats: RoutingStats | None) -> None:
        source.stats = stats

    run = {
        "method": "arrow",
        "seed": None,
        "accuracy": _score(model, tokenizer, tests),
        "health": _health(model, tokenizer, health_rows, arrow_hook),
        "trainable_params": 0,
        "basis": handle.names,
    }
    source.remove()
    detach(model)
    return run


def _mean_std(values: list[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def summarize(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: accuracy per task and effective experts / top share per layer, over seeds."""
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in result["runs"]):
        runs = [r for r in result["runs"] if r["method"] == method]
        out[method] = {
            "n_runs": len(runs),
            "accuracy": {t: [r["accuracy"][t] for r in runs] for t in result["tasks"]},
            "mean_accuracy": [statistics.fmean(r["accuracy"].values()) for r in runs],
            "effective_experts": [r["health"]["effective_experts"] for r in runs],
            "top_share": [r["health"]["top_share"] for r in runs],
        }
    return out


def format_route_study(result: dict[str, Any]) -> str:
    """Two Markdown tables: accuracy per task (mean ± std over seeds), health per layer."""
    summary = summarize(result)
    tasks = result["tasks"]
    lines = [
        "| method | runs | " + " | ".join(tasks) + " | mean |",
        "| --- | ---: | " + " | ".join("---:" for _ in tasks) + " | ---: |",
    ]
    for method, s in summary.items():
        cells = [_mean_std(s["accuracy"][t]) for t in tasks]
        lines.append(
            f"| {method} | {s['n_runs']} | " + " | ".join(cells) + f" | {_mean_std(s['mean_accuracy'])} |"
        )
    layers = len(next(iter(summary.values()))["effective_experts"][0])
    lines += [
        "",
        "| method | "
        + " | ".join(f"L{i} eff. experts" for i in range(layers))
        + " | "
        + " | ".join(f"L{i} top share" for i in range(layers))
        + " |",
        "| --- | " + " | ".join("---:" for _ in range(2 * layers)) + " |",
    ]
    for method, s in summary.items():
        eff = [_mean_std([run[i] for run in s["effective_experts"]], 2) for i in range(layers)]
        top = [_mean_std([run[i] for run in s["top_share"]], 2) for i in range(layers)]
        lines.append(f"| {method} | " + " | ".join(eff + top) + " |")
    return "\n".join(lines)


def health_curves(result: dict[str, Any]) -> dict[str, list[list[float]]]:
    """``{method: [per-run effective experts per layer]}`` for :func:`lorafuse.route.plot_health`."""
    return {m: s["effective_experts"] for m, s in summarize(result).items()}
