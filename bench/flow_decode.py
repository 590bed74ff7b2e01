"""Decoding throughput of LoRA-Flow fusion next to the base, one LoRA and PEFT's X-LoRA.

On one random ``LlamaForCausalLM`` (default 12 layers × 768 hidden, 2048 MLP, 12 heads, vocab
32,000) with random PEFT LoRAs of rank 16 on all 7 projections, greedy generation of
``--new-tokens`` tokens after a ``--prompt``-token prompt, for batch 1 and batch 16:

- ``base``: no adapter;
- ``one LoRA``: a bank with k = 1 (and PEFT's LoRA layer, the peer for this row);
- ``LoRA-Flow k``: k = 2, 4, 8 LoRAs with per-layer gates (random gate weights), KV cache on;
- ``X-LoRA k``: PEFT's ``XLoraModel`` with the same k LoRAs (its classifier needs a scaling pass
  of the whole model before every forward, and it runs without the KV cache, as PEFT forces);
  by default only at k = 8 (the target's comparison) and with ``--xlora-reps 2``, since one
  batch-16 generation takes minutes on a CPU.

Tokens per second = batch × new tokens / seconds (median of ``--reps`` after one warm-up; every
repetition kept). Writes ``bench/results/flow_decode-<device>-<dtype>.json`` and ``.md``.

Usage: ``python bench/flow_decode.py [--device cpu|cuda] [--dtype float32|bfloat16] [--reps 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers
from peft import PeftModel

from _common import timed
from lorafuse import attach, detach, load_lora
from lorafuse.fusion import flow_for
from lorafuse.tiny import random_peft_adapter, save_model, tiny_llama

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--xlora-ks", default="8", help="k values for X-LoRA (the slowest rows); '' = none")
    parser.add_argument("--xlora-reps", type=int, default=2, help="repetitions of X-LoRA (it is slow)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), args.device
    ks = [int(k) for k in args.ks.split(",")]
    xlora_ks = [int(k) for k in args.xlora_ks.split(",") if k.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    rank = 16
    shape = {
        "hidden_size": args.hidden,
        "num_layers": args.layers,
        "num_heads": 12,
        "num_kv_heads": 12,
        "intermediate_size": 2048,
        "vocab_size": 32000,
    }
    workdir = Path(tempfile.mkdtemp(prefix="lorafuse-bench-flow-"))
    base_dir = save_model(tiny_llama(args.seed, **shape), workdir / "base")
    cpu_model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    paths = [
        random_peft_adapter(cpu_model, workdir / f"a{i}", seed=args.seed + 1 + i, r=rank, lora_alpha=2 * rank)
        for i in range(max(ks))
    ]
    del cpu_model
    loras = [load_lora(p) for p in paths]

    def fresh(use_cache: bool = True) -> torch.nn.Module:
        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device).eval()
        model.config.use_cache = use_cache
        return model

    def decode(model: torch.nn.Module, ids: torch.Tensor, use_cache: bool = True) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    use_cache=use_cache,
                    pad_token_id=0,
                )
            assert out.shape[1] == ids.shape[1] + args.new_tokens
            return out

        return run

    rows: list[dict[str, object]] = []

    def record(case: str, batch: int, times: list[float], system: str) -> None:
        tps = batch * args.new_tokens / statistics.median(times)
        rows.append({"case": case, "batch": batch, "system": system, "seconds": times, "tokens_per_s": tps})
        print(
            f"{case:>16} batch {batch:>2} {system:>8}: {tps:8.1f} tok/s"
            f"  (median {statistics.median(times):.3f} s)"
        )

    generator = torch.Generator().manual_seed(args.seed)
    for batch in batches:
        ids = torch.randint(3, 32000, (batch, args.prompt), generator=generator).to(device)
        model = fresh()
        record("base", batch, timed(decode(model, ids), args.reps, device), "base")
        handle = attach(model, [loras[0]])
        record("one LoRA", batch, timed(decode(model, ids), args.reps, device), "lorafuse")
        detach(model)
        peft_model = PeftModel.from_pretrained(model, str(paths[0])).eval()
        record("one LoRA", batch, timed(decode(peft_model, ids), args.reps, device), "PEFT")
        model = peft_model.unload()
        for k in ks:
            handle = attach(model, loras[:k])
            flow = flow_for(handle)
            with torch.no_grad():
                for p in flow.parameters():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
            record(f"LoRA-Flow k={k}", batch, timed(decode(model, ids), args.reps, device), "lorafuse")
            flow.remove()
            detach(model)
        del model
        for k in xlora_ks:
            xmodel = fresh(use_cache=False)
            config = peft.XLoraConfig(
                task_type="CAUSAL_LM",
                hidden_size=args.hidden,
                xlora_depth=1,
                adapters={str(i): str(paths[i]) for i in range(k)},
            )
            xmodel = peft.get_peft_model(xmodel, config).eval()
            run = decode(xmodel, ids, use_cache=False)
            record(f"X-LoRA k={k}", batch, timed(run, min(args.reps, args.xlora_reps), device), "PEFT")
            del xmodel

    def tps(case: str, batch: int, system: str) -> float:
        hit = [r for r in rows if r["case"] == case and r["batch"] == batch and r["system"] == system]
        return float(hit[0]["tokens_per_s"])  # type: ignore[arg-type]

    summary = []
    for batch in batches:
        base = tps("base", batch, "base")
        for k in ks:
            flow = tps(f"LoRA-Flow k={k}", batch, "lorafuse")
            entry = {"batch": batch, "k": k, "flow_tok_s": flow, "flow_vs_base": flow / base}
            if k in xlora_ks:
                xlora = tps(f"X-LoRA k={k}", batch, "PEFT")
                entry.update({"xlora_tok_s": xlora, "flow_vs_xlora": flow / xlora})
            summary.append(entry)
    record_json = {
        "benchmark": "flow_decode",
        "device": device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "model": shape,
        "rank": rank,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "rows": rows,
        "summary": summary,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"flow_decode-{device}-{args.dtype}"
    stem.with_suffix(".json").write_text(json.dumps(record_json, indent=2) + "\n")
    lines = [
        f"Decoding throughput, {device} {args.dtype}, {torch.get_num_threads()} threads, "
        f"{args.layers} layers × "
        f"{args.hidden} hidden, LoRAs rank {rank}, prompt {args.prompt} + {args.new_tokens} new tokens; "
        f"median of {args.reps}",
        "",
        "| case | " + " | ".join(f"batch {b} (tok/s)" for b in batches) + " |",
        "| --- | " + " | ".join("---:" for _ in batches) + " |",
    ]
    cases = list(dict.fromkeys((r["case"], r["system"]) for r in rows))
    for case, system in cases:
        cells = []
        for b in batches:
            hit = [r for r in rows if r["case"] == case and r["system"] == system and r["batch"] == b]
            cells.append(f"{hit[0]['tokens_per_s']:.1f}" if hit else "—")
        label = case if system in ("base", "lorafuse") or case.startswith("X-LoRA") else f"{case} (PEFT)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| batch | k | LoRA-Flow / base | LoRA-Flow / X-LoRA |", "| ---: | ---: | ---: | ---: |"]
    for s in summary:
        ratio = f"{s['flow_vs_xlora']:.1f}×" if "flow_vs_xlora" in s else "—"
        lines.append(f"| {s['batch']} | {s['k']} | {100 * s['flow_vs_base']:.0f} % | {ratio} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
