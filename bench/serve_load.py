"""A bounded load test of ``lorafuse serve`` on loopback: many concurrent clients, 16 compositions.

Starts the real server (uvicorn on 127.0.0.1) on the skill world (``--profile tiny`` by default:
built in seconds) with an adapters folder holding world LoRAs, random LoRAs, three saved fusions
(LoRA-Flow, learned CAT, static) and a compressed delta. ``--requests`` requests (default 2,000)
are sent by ``--concurrency`` client threads (default 32) through the ``openai`` client, a quarter
of them streaming, each naming one of 16 distinct adapters / weighted compositions / fusions, with
seeded random prompts and lengths (``min_tokens = max_tokens``, greedy). It stops by itself.

Then every answer is compared with the single-request path (``attach``/``Fusion.attach`` + HF
``generate``, batch 1). Exit status 1 if any request failed or any answer differs.

The same load runs once per ``--threads`` setting of the engine's intra-op threads (default
``auto,2xcores``): ``auto`` is the server's default (the available cores less one, left to the
HTTP side), ``cores`` the available cores (what torch takes with ``OMP_NUM_THREADS`` unset),
``2xcores`` twice that (oversubscribed), or a number. Each run starts a fresh server and model.

    .venv/bin/python bench/serve_load.py [--requests 2000] [--concurrency 32] [--profile tiny]
                                         [--threads auto,cores,2xcores]

Writes ``bench/results/serve_load-<profile>.json`` (one record per run under ``runs``; the first
run's figures also at the top level) and ``.md`` (one row per run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafuse._io import versions
from lorafuse.serve import Limits, Server, ServeSettings
from lorafuse.serve.engine import available_cores, default_threads
from lorafuse.skillworld import build_world
from lorafuse.studies.serving import reference, serving_folder

BASE = "world"
COMPOSITIONS: list[dict[str, Any]] = [
    *(
        {"model": n}
        for n in ("math", "lang_zorb", "list", "copy", "rand0", "rand1", "rand2", "rand3", "rand4", "rand5")
    ),
    {"model": BASE, "compose": {"math": 0.8, "lang_zorb": 0.6}},
    {"model": BASE, "compose": {"rand0": 0.5, "rand2": 0.5, "list": 1.0}},
    {"model": "flow"},
    {"model": "catw"},
    {"model": "mix"},
    {"model": "tuned"},
]


def thread_count(mode: str) -> int:
    """Engine threads of a ``--threads`` entry: auto, cores, 2xcores or a number."""
    cores = available_cores()
    named = {"auto": default_threads(), "cores": cores, "2xcores": 2 * cores}
    if mode in named:
        return named[mode]
    if not mode.isdigit() or int(mode) < 1:
        raise SystemExit(f"--threads: {mode!r} is not auto, cores, 2xcores or a positive number")
    return int(mode)


def run_load(
    world: Path, folder: Path, requests: list[dict[str, Any]], args: argparse.Namespace, threads: int
) -> dict[str, Any]:
    """Send ``requests`` to a fresh server whose engine runs ``threads`` intra-op threads."""
    tokenizer = AutoTokenizer.from_pretrained(world / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(world / "base", dtype=torch.float32).eval()
    settings = ServeSettings(
        base_name=BASE,
        max_batch=args.max_batch,
        max_loaded=args.max_loaded,
        max_queue=4 * args.requests,
        limits=Limits(max_tokens=64),
        threads=threads,
    )
    server = Server(model, tokenizer, folder, settings)
    answers: list[str | None] = [None] * len(requests)
    latencies: list[float] = [0.0] * len(requests)
    failures: list[str] = []

    def send(client: openai.OpenAI, i: int) -> None:
        r = requests[i]
        extra = {"min_tokens": r["min_tokens"]} | ({"compose": r["compose"]} if "compose" in r else {})
        start = time.perf_counter()
        try:
            out = client.completions.create(
                model=r["model"],
                prompt=r["prompt"],
                max_tokens=r["max_tokens"],
                temperature=0,
                stream=r["stream"],
                extra_body=extra,
            )
            chunks = out if r["stream"] else [out]
            answers[i] = "".join(c.choices[0].text for c in chunks)
        except Exception as exc:  # counted, reported
            failures.append(f"{i}: {type(exc).__name__}: {exc}")
        latencies[i] = time.perf_counter() - start

    with server.background() as url:
        clients = [
            openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
            for _ in range(args.concurrency)
        ]
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as workers:
            list(workers.map(lambda i: send(clients[i % args.concurrency], i), range(len(requests))))
        wall = time.perf_counter() - started
        stats = server.pool.stats
    generated = sum(r["max_tokens"] for r in requests)
    print(
        f"threads {threads}: {len(requests)} requests in {wall:.1f} s, {len(failures)} failed",
        file=sys.stderr,
    )
    return {
        "threads": threads,
        "engine_threads_in_use": server.engine.threads_in_use,
        "answers": answers,
        "failed": len(failures),
        "failures": failures[:20],
        "wall_s": wall,
        "requests_per_s": len(requests) / wall,
        "generated_tokens_per_s": generated / wall,
        "latency_p50_s": statistics.median(latencies),
        "latency_p99_s": sorted(latencies)[int(0.99 * (len(latencies) - 1))],
        "adapter_loads": stats.loads,
        "adapter_evictions": stats.evictions,
        "decode_steps": server.engine.steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-loaded", type=int, default=8, help="LRU limit (below 16 to exercise eviction)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", default="auto,2xcores", help="engine threads per run: auto, cores, 2xcores or N"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    modes = [m.strip() for m in args.threads.split(",") if m.strip()]
    counts = [thread_count(m) for m in modes]

    world = build_world(profile=args.profile, seed=0)
    rng = random.Random(args.seed)
    prompts = [
        json.loads(line)["prompt"]
        for task in ("math", "list", "math_zorb")
        for line in (world / "data" / task / "test.jsonl").open()
    ]
    requests = []
    for i in range(args.requests):
        n = rng.randint(4, 16)
        spec = COMPOSITIONS[i % len(COMPOSITIONS)]
        requests.append(
            {**spec, "prompt": rng.choice(prompts), "max_tokens": n, "min_tokens": n, "stream": i % 4 == 0}
        )
    rng.shuffle(requests)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapters"
        serving_folder(world, folder)
        runs = [run_load(world, folder, requests, args, threads) for threads in counts]
        tokenizer = AutoTokenizer.from_pretrained(world / "tokenizer")
        ref_model = AutoModelForCausalLM.from_pretrained(world / "base", dtype=torch.float32).eval()
        cache: dict[str, str] = {}
        for run in runs:
            mismatches = []
            for i, r in enumerate(requests):
                key = json.dumps({k: v for k, v in r.items() if k != "stream"}, sort_keys=True)
                if key not in cache:
                    cache[key] = reference(ref_model, tokenizer, folder, r, BASE)
                served = run["answers"][i]
                if served is not None and served != cache[key]:
                    mismatches.append({"request": r, "served": served, "single": cache[key]})
            run["mismatches"] = len(mismatches)
            run["mismatch_examples"] = mismatches[:5]
            run["distinct_answers"] = len({a for a in run.pop("answers") if a is not None})

    for mode, run in zip(modes, runs, strict=True):
        run["mode"] = mode
    first = runs[0]
    record = {
        "benchmark": "serve_load",
        "settings": vars(args) | {"out": str(args.out)},
        "compositions": len(COMPOSITIONS),
        "requests": len(requests),
        **{k: v for k, v in first.items() if k not in ("mode", "threads")},
        "threads": first["threads"],
        "available_cores": available_cores(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "runs": runs,
        "versions": versions(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serve_load-{args.profile}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    head = [
        "engine threads",
        "requests",
        "concurrent",
        "compositions",
        "failed",
        "answers ≠ single-request",
        "distinct answers",
        "wall s",
        "req/s",
        "tokens/s",
        "p50 s",
        "p99 s",
        "loads / evictions",
    ]
    rows = [
        [
            f"{run['threads']} ({run['mode']})",
            len(requests),
            args.concurrency,
            len(COMPOSITIONS),
            run["failed"],
            run["mismatches"],
            run["distinct_answers"],
            f"{run['wall_s']:.1f}",
            f"{run['requests_per_s']:.1f}",
            f"{run['generated_tokens_per_s']:.0f}",
            f"{run['latency_p50_s']:.2f}",
            f"{run['latency_p99_s']:.2f}",
            f"{run['adapter_loads']} / {run['adapter_evictions']}",
        ]
        for run in runs
    ]
    table = "\n".join(
        [
            "| " + " | ".join(head) + " |",
            "|" + " --- |" * len(head),
            *("| " + " | ".join(map(str, cells)) + " |" for cells in rows),
            "",
            f"{available_cores()} core(s) available; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}.",
            "",
        ]
    )
    stem.with_suffix(".md").write_text(table)
    print(table)
    bad = any(run["failed"] or run["mismatches"] for run in runs)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
