"""Generated tokens per second of one batch that uses 1, 8 or 64 distinct adapters.

lorafuse's serving engine (continuous batching, per-row adapters through the pool's flat rank
tables; adapters already loaded) next to PEFT's mixed-batch generation (``generate(...,
adapter_names=[...])``, which loops over the adapters of the batch in every adapted layer), on
the same random ``LlamaForCausalLM`` (default 12 layers × 768 hidden, 2048 MLP, vocab 32000) and
the same random rank-16 LoRAs. Row ``i`` of the batch of 64 uses adapter ``i mod D``. Every row
generates exactly ``--new-tokens`` tokens (end-of-sequence banned, greedy), so both systems do
the same work; the greedy tokens of both are compared (fraction of identical rows reported).

    .venv/bin/python bench/serve_throughput.py [--reps 5] [--device cuda] [--dtype bfloat16]

Writes ``bench/results/serve_throughput-<device>-<dtype>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from _common import timed
from lorafuse import __version__, load_lora
from lorafuse._io import versions
from lorafuse.runtime.pool import AdapterPool
from lorafuse.serve.compose import Composition, Part
from lorafuse.serve.engine import Engine, Request, SamplingParams
from lorafuse.tiny import word_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--distinct", default="1,8,64")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--peft-reps", type=int, default=None, help="repetitions for PEFT (default --reps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--name", default=None, help="results file stem (default serve_throughput-<device>-<dtype>)"
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    distinct = [int(d) for d in args.distinct.split(",")]
    n_adapters = max(distinct)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        vocab_size=32000,
        max_position_embeddings=512,
    )
    base = LlamaForCausalLM(config).eval()
    tokenizer = word_tokenizer(config.vocab_size)
    folder = args.out / "_serve_adapters"
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    peft_config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=args.targets.split(","))
    skeleton = get_peft_model(LlamaForCausalLM(config), peft_config)
    g = torch.Generator().manual_seed(args.seed)
    for i in range(n_adapters):
        with torch.no_grad():
            for name, p in skeleton.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        skeleton.save_pretrained(folder / f"a{i}")
        names.append(f"a{i}")
    del skeleton
    print(f"{n_adapters} adapters written to {folder}", file=sys.stderr)

    ids = torch.randint(3, config.vocab_size, (args.batch, args.prompt), generator=g)  # (B, T)
    prompts = ids.tolist()

    # -- lorafuse --------------------------------------------------------------------------------
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(base.state_dict())
    model = model.to(args.device, dtype)
    pool = AdapterPool(model)
    for name in names:
        pool.add(name, load_lora(folder / name))
    engine = Engine(
        model, tokenizer, pool, max_batch=args.batch, max_queue=10 * args.batch, max_loaded=10_000
    )
    engine.start()
    params = SamplingParams(max_tokens=args.new_tokens, min_tokens=args.new_tokens, temperature=0.0)

    def run_engine(d: int) -> list[list[int]]:
        """``d`` distinct adapters over the batch (preloaded); ``d = 0``: the base model alone."""
        done = threading.Semaphore(0)
        requests = []
        for i, prompt in enumerate(prompts):
            name = names[i % d] if d else "base"
            parts = (Part(name, lambda: None, 1.0),) if d else ()  # type: ignore[arg-type,return-value]
            request = Request(
                list(prompt),
                Composition(name, parts),
                params,
                lambda e: done.release() if e.kind != "text" else None,
            )
            requests.append(request)
        for r in requests:
            engine.submit(r)
        for _ in requests:
            done.acquire()
        return [r.generated for r in requests]

    # -- PEFT ------------------------------------------------------------------------------------
    peft_base = LlamaForCausalLM(config).eval()
    peft_base.load_state_dict(base.state_dict())
    peft = PeftModel.from_pretrained(peft_base, str(folder / names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(str(folder / name), adapter_name=name)
    peft = peft.to(args.device, dtype).eval()
    attention = torch.ones_like(ids)

    def run_peft(d: int) -> list[list[int]]:
        with torch.no_grad():
            out = peft.generate(
                input_ids=ids.to(args.device),
                attention_mask=attention.to(args.device),
                adapter_names=[names[i % d] for i in range(args.batch)],
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        return out[:, args.prompt :].tolist()

    rows = []
    tokens = args.batch * args.new_tokens
    base_tok_s = tokens / statistics.median(timed(lambda: run_engine(0), args.reps, args.device))
    print(f"base (no adapter): {base_tok_s:.1f} tok/s", file=sys.stderr)
    for d in distinct:
        same = sum(a == b for a, b in zip(run_engine(d), run_peft(d), strict=True)) / args.batch
        t_lf = timed(lambda d=d: run_engine(d), args.reps, args.device)
        kernel = "table" if pool.stats.forwards["table"] else "gathered"
        pool.stats.forwards = {"gathered": 0, "table": 0}
        t_peft = timed(lambda d=d: run_peft(d), args.peft_reps or args.reps, args.device)
        row = {
            "distinct_adapters": d,
            "lorafuse_s": t_lf,
            "peft_s": t_peft,
            "lorafuse_tok_s": tokens / statistics.median(t_lf),
            "peft_tok_s": tokens / statistics.median(t_peft),
            "identical_rows": same,
            "lorafuse_kernel": kernel,
        }
        rows.append(row)
        print(
            f"D={d:3d}: lorafuse {row['lorafuse_tok_s']:8.1f} tok/s ({kernel}), "
            f"PEFT {row['peft_tok_s']:8.1f} tok/s, ×{row['lorafuse_tok_s'] / row['peft_tok_s']:.2f}, "
            f"identical rows {same:.0%}",
            file=sys.stderr,
        )
    engine.stop()
    single = rows[0]["lorafuse_tok_s"] if rows[0]["distinct_adapters"] == 1 else None
    for row in rows:
        row["vs_peft"] = row["lorafuse_tok_s"] / row["peft_tok_s"]
        row["vs_own_single"] = single / row["lorafuse_tok_s"] if single else None
        row["share_of_base"] = row["lorafuse_tok_s"] / base_tok_s
    record = {
        "benchmark": "serve_throughput",
        "settings": vars(args) | {"out": str(args.out)},
        "model": {"layers": args.layers, "hidden": args.hidden, "vocab": 32000},
        "base_tok_s": base_tok_s,
        "rows": rows,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "versions": versions() | {"lorafuse": __version__},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    stem = args.out / (args.name or f"serve_throughput-{args.device}-{args.dtype}")
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"Batch of {args.batch} rows, prompt {args.prompt} + {args.new_tokens} generated tokens each; "
        f"{args.layers} layers × {args.hidden}, LoRA rank {args.rank} on {args.targets}; {args.device} "
        f"{args.dtype}, {torch.get_num_threads()} threads; median of {args.reps} (tokens/s). "
        f"Base model alone (lorafuse engine, no adapter): {base_tok_s:.1f} tok/s.",
        "",
        "| distinct adapters | lorafuse tok/s | PEFT tok/s | lorafuse / PEFT | own single-adapter / this "
        "| lorafuse / base | identical greedy rows |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        own = f"{row['vs_own_single']:.2f}" if row["vs_own_single"] else "–"
        lines.append(
            f"| {row['distinct_adapters']} | {row['lorafuse_tok_s']:.1f} | {row['peft_tok_s']:.1f} | "
            f"{row['vs_peft']:.2f}× | {own} | {row['share_of_base']:.0%} | {row['identical_rows']:.0%} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
