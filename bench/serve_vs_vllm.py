"""``lorafuse serve`` next to vLLM (its CPU build) on the same base, adapters and request mix.

Both engines run as servers in their own processes on loopback, started the way a user starts
them: ``lorafuse serve --base B --adapters A`` and the launch line ``lorafuse export vllm`` writes
for the same adapters (vLLM from ``$LORAFUSE_VLLM_PYTHON``, default ``.venv-vllm/bin/python``;
``make venv-vllm``). Base: a random ``LlamaForCausalLM`` (default 2 layers × 256 hidden, head
size 64, vocab 32000, float32) with a word-level tokenizer; adapters: random rank-16 PEFT LoRAs
on q/k/v/o. For every number of distinct adapters D (default 1, 8, 64) and client concurrency C
(default 16, 64), ``--requests`` requests (default 64) of ``--prompt`` random token ids (default
16; token-id prompts, so both engines see the same ids) each generate exactly ``--new-tokens``
tokens (default 32; ``min_tokens = max_tokens``, greedy); request ``i`` names adapter ``i mod D``.
Measured per repetition (all kept): wall time, generated tokens/s, p50/p99 request latency; and
per engine its start-up time (process start to ``/health``). The greedy texts of each engine are
compared with the first engine's (fraction identical).

Engines (``--engines``, comma-separated):

- ``lorafuse``: ``lorafuse serve`` with its default threads (the cores less one);
- ``lorafuse-t1``: ``lorafuse serve --threads 1`` with ``OMP_NUM_THREADS=1``;
- ``vllm``: vLLM's OpenAI server from the export's launch line, ``--enforce-eager``,
  ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB), ``--max-loras`` raised to hold every adapter;
- ``lorafuse-vllm``: ``lorafuse serve --engine vllm --vllm-launch``: lorafuse's API in front of
  a vLLM it starts with the ``vllm`` engine's settings (its start-up includes vLLM's).

    .venv/bin/python bench/serve_vs_vllm.py [--engines lorafuse,lorafuse-t1,vllm] [--reps 2]

Writes ``bench/results/serve_vs_vllm.json`` and ``.md``; the machine's load average before and
after each engine is recorded (the numbers are only comparable on an otherwise idle machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from lorafuse import __version__
from lorafuse._io import versions
from lorafuse.export import export_vllm, vllm_max_rank
from lorafuse.tiny import word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(args: argparse.Namespace, work: Path) -> tuple[Path, Path, list[str]]:
    """The base folder (model + tokenizer), the adapters folder and the adapter names."""
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        vocab_size=args.vocab,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    base = LlamaForCausalLM(config).eval()
    base_dir = work / "base"
    base.save_pretrained(base_dir)
    word_tokenizer(args.vocab).save_pretrained(str(base_dir))
    folder = work / "adapters"
    peft_config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=args.targets.split(","))
    skeleton = get_peft_model(base, peft_config)
    g = torch.Generator().manual_seed(args.seed)
    names = []
    for i in range(max(args.distinct)):
        with torch.no_grad():
            for name, p in skeleton.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        skeleton.save_pretrained(folder / f"a{i}")
        names.append(f"a{i}")
    return base_dir, folder, names


class Engine:
    """One server: its command, environment, the model names it serves, a log."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], base_model: str, log: Path) -> None:
        self.name, self.args, self.env, self.base_model, self.log = name, args, env, base_model, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, port: int) -> float:
        """Start and wait for ``/health``; returns the seconds it took."""
        self.url = f"http://127.0.0.1:{port}"
        start = time.monotonic()
        with self.log.open("w") as sink:
            self.proc = subprocess.Popen(
                self.args, stdout=sink, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() - start > START_TIMEOUT:
                self.stop()
                raise RuntimeError(f"{self.name} not healthy after {START_TIMEOUT} s")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def lorafuse_engine(threads: int | None) -> Callable[..., Engine]:
    def make(base: Path, folder: Path, work: Path, args: argparse.Namespace, port: int) -> Engine:
        cmd = [sys.executable, "-m", "lorafuse", "serve", "--base", str(base), "--adapters", str(folder)]
        cmd += ["--port", str(port), "--max-batch", str(max(args.concurrency)), "--max-queue", "4096"]
        cmd += ["--max-loaded", str(max(args.distinct) + 1), "--log-level", "warning"]
        env = dict(os.environ)
        if threads is not None:
            cmd += ["--threads", str(threads)]
            env["OMP_NUM_THREADS"] = str(threads)
        name = "lorafuse" if threads is None else f"lorafuse-t{threads}"
        return Engine(name, cmd, env, base.name, work / f"{name}.log")

    return make


def lorafuse_vllm_engine(base: Path, folder: Path, work: Path, args: argparse.Namespace, port: int) -> Engine:
    """``lorafuse serve --engine vllm --vllm-launch``: lorafuse in front of a vLLM it starts with
    the same settings as the ``vllm`` engine (slots, sequences, eager, float32)."""
    python = Path(os.environ.get("LORAFUSE_VLLM_PYTHON", ".venv-vllm/bin/python"))
    python = python if python.is_absolute() else ROOT / python
    if not python.is_file():
        raise FileNotFoundError(f"no vLLM interpreter at {python} (make venv-vllm)")
    engine = lorafuse_engine(None)(base, folder, work, args, port)
    engine.name, engine.log = "lorafuse-vllm", work / "lorafuse-vllm.log"
    slots = str(max(args.distinct) + 1)
    vllm_args = ["--dtype", "float32", "--enforce-eager", "--max-loras", slots, "--max-cpu-loras", slots]
    vllm_args += ["--max-num-seqs", str(max(args.concurrency)), *shlex.split(args.vllm_args)]
    engine.args += ["--engine", "vllm", "--vllm-launch", "--vllm-python", str(python)]
    engine.args += ["--vllm-max-lora-rank", str(vllm_max_rank(args.rank) or args.rank)]
    engine.args += ["--vllm-cache", str(work / "vllm-cache"), "--vllm-args", shlex.join(vllm_args)]
    engine.env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    return engine


def vllm_engine(base: Path, folder: Path, work: Path, args: argparse.Namespace, port: int) -> Engine:
    export = export_vllm(folder, work / "vllm-export", base=base, overwrite=True)
    line = shlex.split(export.launch())
    python = Path(os.environ.get("LORAFUSE_VLLM_PYTHON", ".venv-vllm/bin/python"))
    python = python if python.is_absolute() else ROOT / python
    if not python.is_file():
        raise FileNotFoundError(f"no vLLM interpreter at {python} (make venv-vllm)")
    slots = str(max(args.distinct) + 1)  # every adapter of a batch in a slot, and a spare one
    cmd = [str(python), *line[1:], "--host", "127.0.0.1", "--port", str(port), "--enforce-eager"]
    cmd += ["--max-loras", slots, "--max-cpu-loras", slots, "--max-num-seqs", str(max(args.concurrency))]
    cmd += shlex.split(args.vllm_args)
    env = dict(os.environ) | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("PYTHONPATH", None)
    return Engine("vllm", cmd, env, export.base, work / "vllm.log")


ENGINES: dict[str, Callable[..., Engine]] = {
    "lorafuse": lorafuse_engine(None),
    "lorafuse-t1": lorafuse_engine(1),
    "vllm": vllm_engine,
    "lorafuse-vllm": lorafuse_vllm_engine,
}


async def run_load(
    url: str, names: list[str], prompts: list[list[int]], concurrency: int, new_tokens: int
) -> dict[str, Any]:
    """Send every prompt (request ``i`` naming ``names[i % len(names)]``), ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)
    latencies = [0.0] * len(prompts)
    texts = [""] * len(prompts)
    tokens = [0] * len(prompts)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one(i: int) -> None:
            body = {
                "model": names[i % len(names)],
                "prompt": prompts[i],
                "max_tokens": new_tokens,
                "min_tokens": new_tokens,
                "temperature": 0,
            }
            async with gate:
                start = time.perf_counter()
                response = await client.post(url + "/v1/completions", json=body)
                latencies[i] = time.perf_counter() - start
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
            out = response.json()
            texts[i] = out["choices"][0]["text"].strip()
            tokens[i] = out["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(prompts))))
        wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "wall_s": wall,
        "tok_s": sum(tokens) / wall,
        "completion_tokens": sum(tokens),
        "p50_s": statistics.median(ordered),
        "p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "texts": texts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", default="lorafuse,lorafuse-t1,vllm", help=f"of {', '.join(ENGINES)}")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--distinct", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64])
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="serve_vs_vllm")
    parser.add_argument(
        "--vllm-args", default="", help="more arguments for vLLM's server (after ours: the last one wins)"
    )
    args = parser.parse_args()
    engines = args.engines.split(",")
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")

    work = Path(tempfile.mkdtemp(prefix="serve_vs_vllm-"))
    try:
        run(args, engines, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, engines: list[str], work: Path) -> None:
    base, folder, names = build(args, work)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(3, args.vocab, (args.requests, args.prompt), generator=g).tolist()
    print(f"base and {len(names)} adapters in {work}", file=sys.stderr)

    record: dict[str, Any] = {
        "benchmark": "serve_vs_vllm",
        "settings": vars(args) | {"out": str(args.out)},
        "engines": {},
        "rows": [],
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "versions": versions() | {"lorafuse": __version__},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    first_texts: dict[tuple[int, int], list[str]] = {}
    for name in engines:
        load_before = os.getloadavg()
        try:
            engine = ENGINES[name](base, folder, work, args, _free_port())
        except (NotImplementedError, FileNotFoundError) as exc:
            print(f"{name}: skipped ({exc})", file=sys.stderr)
            record["engines"][name] = {"skipped": str(exc)}
            continue
        port = int(engine.args[engine.args.index("--port") + 1])
        started = engine.start(port)
        print(f"{name}: healthy after {started:.1f} s", file=sys.stderr)
        try:
            for d in args.distinct:
                served = names[:d]
                asyncio.run(run_load(engine.url, served, prompts[: min(8, len(prompts))], 8, 4))  # warm-up
                for c in args.concurrency:
                    reps = [asyncio.run(run_load(engine.url, served, prompts, c, args.new_tokens))]
                    reps += [
                        asyncio.run(run_load(engine.url, served, prompts, c, args.new_tokens))
                        for _ in range(args.reps - 1)
                    ]
                    texts = reps[0]["texts"]
                    reference = first_texts.setdefault((d, c), texts)
                    same = sum(a == b for a, b in zip(texts, reference, strict=True)) / len(texts)
                    row = {
                        "engine": name,
                        "distinct_adapters": d,
                        "concurrency": c,
                        "reps": [{k: v for k, v in r.items() if k != "texts"} for r in reps],
                        "tok_s": statistics.median(r["tok_s"] for r in reps),
                        "p50_s": statistics.median(r["p50_s"] for r in reps),
                        "p99_s": statistics.median(r["p99_s"] for r in reps),
                        "identical_to_first_engine": same,
                    }
                    record["rows"].append(row)
                    print(
                        f"{name:14s} D={d:3d} C={c:3d}: {row['tok_s']:8.1f} tok/s, p50 {row['p50_s']:.2f} s, "
                        f"p99 {row['p99_s']:.2f} s, same greedy text as {engines[0]}: {same:.0%}",
                        file=sys.stderr,
                    )
        finally:
            engine.stop()
        record["engines"][name] = {
            "startup_s": started,
            "command": shlex.join(engine.args),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        }

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / args.name
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    peer = "vllm" if any(r["engine"] == "vllm" for r in record["rows"]) else engines[0]
    peer_tok = {
        (r["distinct_adapters"], r["concurrency"]): r["tok_s"] for r in record["rows"] if r["engine"] == peer
    }
    lines = [
        f"{args.requests} requests × {args.new_tokens} generated tokens (prompt {args.prompt} token ids, "
        f"greedy); random Llama {args.layers} layers × {args.hidden} hidden, vocab {args.vocab}, float32; "
        f"rank-{args.rank} LoRAs on {args.targets}; {os.cpu_count()} CPUs; median of {args.reps} "
        "(every repetition in the JSON).",
        "",
        "| engine | start-up s | distinct adapters | concurrency | tok/s | p50 latency s | p99 latency s | "
        f"tok/s vs {peer} | same greedy text as {engines[0]} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in record["rows"]:
        info = record["engines"][row["engine"]]
        ratio = row["tok_s"] / peer_tok[(row["distinct_adapters"], row["concurrency"])]
        lines.append(
            f"| {row['engine']} | {info['startup_s']:.0f} | {row['distinct_adapters']} | "
            f"{row['concurrency']} | {row['tok_s']:.1f} | {row['p50_s']:.2f} | {row['p99_s']:.2f} | "
            f"{ratio:.2f}× | "
            f"{row['identical_to_first_engine']:.0%} |"
        )
    for name, info in record["engines"].items():
        if "skipped" in info:
            lines.append(f"\n{name}: not run ({info['skipped']}).")
        else:
            before = ", ".join(f"{x:.2f}" for x in info["loadavg_before"])
            lines.append(f"\n{name}: load average before {before}.")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
