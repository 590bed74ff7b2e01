"""Compressing whole checkpoints at Llama-2-7B width: peak memory must not grow with depth.

For each depth in ``--layers`` (default 2, 4, 8 decoder layers), a child process writes a
synthetic checkpoint pair to disk — a bf16 base (Llama layout: hidden 4096, MLP 11008, 32
heads, vocabulary 32000, one safetensors shard per decoder layer plus one for embeddings / norm /
LM head, with ``model.safetensors.index.json``) and a fine-tune ``W + U V`` (rank 64, plus noise)
on every projection — then a fresh child runs, end to end:

1. ``compress_checkpoint(base, ft, out, method=..., calibration=...)``: layer-by-layer
   calibration on ``--samples`` random sequences of ``--tokens`` tokens (the fine-tune reads
   them one decoder layer at a time), every projection compressed at ``--budget``;
2. ``decompress(out, base, model_out)``: base + ΔŴ written back shard by shard.

It reports wall time and peak resident memory of each step (sampled every 2 ms, minus the
child's start; also its anonymous part alone, without the safetensors pages mapped from
disk, which the kernel drops under pressure), the checkpoint sizes and the compressed bytes.
The claim under test: peak RSS stays flat as depth doubles (one decoder layer, its Hessians and
the activations at a time); only the compressed delta itself, the output, held packed at its
on-disk size (``budget × fp16``), grows with depth.

``--method`` defaults to ``bitdelta`` so the sweep finishes on a 2-core CPU: Delta-CoMe's full
SVD and GPTQ of a 4096×11008 delta take about 10 minutes a layer there (see compress_7b.py);
the pipeline's memory is the same for every method (plus each method's own per-matrix work).

Usage: ``python bench/compress_model.py [--layers 2,4,8] [--method bitdelta] [--budget 1/16]
[--samples 16] [--tokens 256] [--threads 2] [--quick] [--name compress_model]``; writes
``bench/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from _common import PeakSampler, run_in_child

RESULTS = Path(__file__).parent / "results"
WIDTHS = {"7b": (4096, 11008, 32, 32000), "quick": (512, 1376, 8, 4000)}


def projections(hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    return {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


def write_pair(root: Path, layers: int, width: str, seed: int) -> dict:
    """Write base/ and ft/ (one shard per decoder layer); return their sizes in bytes."""
    hidden, inter, heads, vocab = WIDTHS[width]
    g = torch.Generator().manual_seed(seed)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
    }
    sizes = {}
    for name in ("base", "ft"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
    shards = [f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors" for i in range(layers + 1)]
    weight_map: dict[str, str] = {}

    def put(shard: str, base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor]) -> None:
        weight_map.update(dict.fromkeys(base, shard))
        save_file(base, str(root / "base" / shard), metadata={"format": "pt"})
        save_file(ft, str(root / "ft" / shard), metadata={"format": "pt"})

    emb = (torch.randn(vocab, hidden, generator=g) * 0.02).bfloat16()
    head = (torch.randn(vocab, hidden, generator=g) * 0.02).bfloat16()
    norm = torch.ones(hidden, dtype=torch.bfloat16)
    outside = {"model.embed_tokens.weight": emb, "lm_head.weight": head, "model.norm.weight": norm}
    put(shards[0], outside, dict(outside))
    for i in range(layers):
        base, ft = {}, {}
        for suffix in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            base[f"model.layers.{i}.{suffix}"] = torch.ones(hidden, dtype=torch.bfloat16)
            ft[f"model.layers.{i}.{suffix}"] = torch.ones(hidden, dtype=torch.bfloat16)
        for proj, (out_dim, in_dim) in projections(hidden, inter).items():
            key = f"model.layers.{i}.{proj}.weight"
            w = torch.randn(out_dim, in_dim, generator=g) * 0.02  # (out, in)
            u = torch.randn(out_dim, 64, generator=g) * 0.01  # (out, 64)
            v = torch.randn(64, in_dim, generator=g) * 0.01  # (64, in)
            delta = u @ v + 1e-4 * torch.randn(out_dim, in_dim, generator=g)  # (out, in)
            base[key], ft[key] = w.bfloat16(), (w + delta).bfloat16()
            del w, u, v, delta
        put(shards[i + 1], base, ft)
    index = {"metadata": {}, "weight_map": weight_map}
    for name in ("base", "ft"):
        (root / name / "model.safetensors.index.json").write_text(json.dumps(index))
        sizes[name] = sum(p.stat().st_size for p in (root / name).glob("*.safetensors"))
    return sizes


def measure(
    root: str, method: str, budget: str, samples: int, tokens: int, threads: int, seed: int, queue
) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(threads)
    from lorafuse.compress import compress_checkpoint, decompress

    root_path = Path(root)
    vocab = json.loads((root_path / "base" / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    calibration = [torch.randint(0, vocab, (tokens,), generator=g) for _ in range(samples)]
    result = {}
    with PeakSampler() as sampler:
        start = time.perf_counter()
        delta = compress_checkpoint(
            root_path / "base",
            root_path / "ft",
            root_path / "delta",
            method=method,
            budget=budget,
            calibration=calibration,
            progress=False,
        )
        result["compress_s"] = round(time.perf_counter() - start, 2)
    result["compress_peak_extra_mib"] = round(sampler.extra, 1)
    result["compress_peak_extra_anon_mib"] = round(sampler.anon_extra, 1)
    result["compressed_nbytes"] = delta.nbytes
    result["fp16_nbytes"] = delta.fp16_nbytes
    errors = [m["activation_error"] for m in delta.info["modules"].values()]
    result["mean_activation_error"] = round(sum(errors) / len(errors), 4)
    del delta
    with PeakSampler() as sampler:
        start = time.perf_counter()
        decompress(root_path / "delta", root_path / "base", root_path / "model", progress=False)
        result["decompress_s"] = round(time.perf_counter() - start, 2)
    result["decompress_peak_extra_mib"] = round(sampler.extra, 1)
    result["decompress_peak_extra_anon_mib"] = round(sampler.anon_extra, 1)
    queue.put(result)


def write_child(root: str, layers: int, width: str, seed: int, queue) -> None:  # type: ignore[no-untyped-def]
    queue.put(write_pair(Path(root), layers, width, seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="2,4,8")
    parser.add_argument("--method", default="bitdelta")
    parser.add_argument("--budget", default="1/16")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="hidden 512 instead of 4096 (a smoke run)")
    parser.add_argument("--name", default="compress_model")
    parser.add_argument("--tmp", default=None, help="folder for the checkpoints [default: a temp dir]")
    args = parser.parse_args()
    width = "quick" if args.quick else "7b"
    rows = []
    meta = {
        "command": "python bench/compress_model.py " + " ".join(os.sys.argv[1:]),
        "width": dict(zip(("hidden", "intermediate", "heads", "vocab"), WIDTHS[width], strict=True)),
        "method": args.method,
        "budget": args.budget,
        "samples": args.samples,
        "tokens": args.tokens,
        "threads": args.threads,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    for layers in [int(x) for x in args.layers.split(",")]:
        root = Path(tempfile.mkdtemp(prefix=f"compress-model-{layers}-", dir=args.tmp))
        try:
            start = time.perf_counter()
            sizes = run_in_child(write_child, str(root), layers, width, args.seed)
            written = round(time.perf_counter() - start, 1)
            result = run_in_child(
                measure,
                str(root),
                args.method,
                args.budget,
                args.samples,
                args.tokens,
                args.threads,
                args.seed,
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)
        row = {"layers": layers, "checkpoint_bytes": sizes["ft"], "write_s": written, **result}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(args.name, meta, rows)


def save(name: str, meta: dict, rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    w = meta["width"]
    lines = [
        f"Compressing whole checkpoints, hidden {w['hidden']} / MLP {w['intermediate']} (bf16 on disk), "
        f"{meta['method']} at {meta['budget']}, layer-by-layer calibration on {meta['samples']}×"
        f"{meta['tokens']} tokens, {meta['threads']} thread(s), CPU",
        "",
        "| decoder layers | checkpoint GiB | compress s | compress peak extra MiB (anon.) | decompress s "
        "| decompress peak extra MiB (anon.) | compressed MiB | × fp16 | mean act. err |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['checkpoint_bytes'] / 2**30:.2f} | {r['compress_s']} | "
            f"{r['compress_peak_extra_mib']:,.0f} ({r.get('compress_peak_extra_anon_mib', 0):,.0f}) | "
            f"{r['decompress_s']} | "
            f"{r['decompress_peak_extra_mib']:,.0f} ({r.get('decompress_peak_extra_anon_mib', 0):,.0f}) | "
            f"{r['compressed_nbytes'] / 2**20:.1f} | {r['compressed_nbytes'] / r['fp16_nbytes']:.4f} | "
            f"{r['mean_activation_error']} |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
