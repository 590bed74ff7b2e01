"""What does the LoRA bank cost next to PEFT, on the same model and adapters, in one process?

Three questions, each timed for both systems side by side (1 warm-up, ``--reps`` repetitions,
median quoted, every repetition kept in the JSON):

1. ``single``: a prefill forward pass with one adapter (PEFT's LoRA layer vs a bank with k = 1).
2. ``weighted``: k adapters combined with static weights: PEFT's ``cat`` merge (one adapter of
   rank Σr, built beforehand) vs the bank with ``(k,)`` weights (no merge step).
3. ``mixed``: greedy generation for a batch whose rows use different adapters: PEFT's
   ``generate(adapter_names=...)`` vs the bank with ``(batch, k)`` one-hot weights.

Usage: ``python bench/bank_overhead.py [--device cpu|cuda] [--dtype float32|bfloat16] [--quick]``.
Writes ``bench/results/bank_overhead-<device>-<dtype>.json`` and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import peft
import torch
import transformers
from peft import PeftModel

from _common import timed
from lorafuse import attach, load_lora
from lorafuse.tiny import random_peft_adapter, save_model, tiny_llama

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smaller model, for a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    shape = (
        {"hidden_size": 128, "num_layers": 2, "intermediate_size": 344, "vocab_size": 512}
        if args.quick
        else {"hidden_size": 512, "num_layers": 4, "intermediate_size": 1376, "vocab_size": 2048}
    )
    k, rank, batch, seq, new_tokens = 4, 16, 8, 128, 16
    workdir = Path(tempfile.mkdtemp(prefix="lorafuse-bench-"))
    base_dir = save_model(tiny_llama(args.seed, num_heads=8, num_kv_heads=4, **shape), workdir / "base")
    cpu_model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    names = [f"a{i}" for i in range(k)]
    paths = [
        random_peft_adapter(cpu_model, workdir / n, seed=args.seed + 1 + i, r=rank, lora_alpha=2 * rank)
        for i, n in enumerate(names)
    ]

    def base_model() -> torch.nn.Module:
        return copy.deepcopy(cpu_model).to(args.device, dtype).eval()

    peft_model = PeftModel.from_pretrained(base_model(), paths[0], adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:], strict=True):
        peft_model.load_adapter(path, adapter_name=name)
    weights = [0.5, -0.25, 1.0, 0.75]
    peft_model.add_weighted_adapter(names, weights, "cat", combination_type="cat")
    peft_model.to(args.device).eval()
    ours = base_model()
    bank = attach(ours, {n: load_lora(p) for n, p in zip(names, paths, strict=True)})
    plain = base_model()

    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, shape["vocab_size"], (batch, seq), generator=gen).to(args.device)
    prompt = ids[:, :32]
    row_adapters = [names[i % k] for i in range(batch)]
    one_hot = torch.nn.functional.one_hot(torch.arange(batch) % k, k).float()
    gen_kwargs = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": 0,
    }

    rows: dict[str, dict[str, list[float]]] = {}
    with torch.inference_mode():
        rows["base forward (no adapter)"] = {"ours": timed(lambda: plain(ids), args.reps, args.device)}

        peft_model.set_adapter(names[0])
        single = base_model()
        attach(single, {names[0]: load_lora(paths[0])})  # a k = 1 bank
        rows["single: forward, 1 adapter"] = {
            "peft": timed(lambda: peft_model(ids), args.reps, args.device),
            "ours": timed(lambda: single(ids), args.reps, args.device),
        }

        peft_model.set_adapter("cat")
        bank.set_weights(weights)
        rows[f"weighted: forward, {k} adapters, static w"] = {
            "peft": timed(lambda: peft_model(ids), args.reps, args.device),
            "ours": timed(lambda: ours(ids), args.reps, args.device),
        }

        bank.set_weights(one_hot)
        rows[f"mixed: generate {new_tokens} tokens, {k} adapters in a batch of {batch}"] = {
            "peft": timed(
                lambda: peft_model.generate(input_ids=prompt, adapter_names=row_adapters, **gen_kwargs),
                args.reps,
                args.device,
            ),
            "ours": timed(lambda: ours.generate(prompt, **gen_kwargs), args.reps, args.device),
        }

    table = []
    for name, result in rows.items():
        ours_ms = statistics.median(result["ours"]) * 1e3
        peft_ms = statistics.median(result["peft"]) * 1e3 if "peft" in result else None
        table.append(
            {
                "case": name,
                "peft_ms": peft_ms,
                "lorafuse_ms": ours_ms,
                "speedup_vs_peft": (peft_ms / ours_ms) if peft_ms else None,
                "repetitions": result,
            }
        )
    record = {
        "question": "latency of the LoRA bank vs PEFT on the same model and adapters",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "model": shape,
        "adapters": {"k": k, "rank": rank},
        "batch": batch,
        "seq": seq,
        "new_tokens": new_tokens,
        "reps": args.reps,
        "seed": args.seed,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "results": table,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = f"bank_overhead-{args.device}-{args.dtype}" + ("-quick" if args.quick else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"Bank vs PEFT, {args.device} {args.dtype}, {torch.get_num_threads()} threads, "
        f"model {shape}, "
        f"k={k} rank {rank}, batch {batch}×{seq}; median of {args.reps}",
        "",
        "| case | PEFT (ms) | lorafuse (ms) | PEFT / lorafuse |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in table:
        peft_cell = f"{row['peft_ms']:.1f}" if row["peft_ms"] else "—"
        ratio = f"{row['speedup_vs_peft']:.2f}×" if row["speedup_vs_peft"] else "—"
        lines.append(f"| {row['case']} | {peft_cell} | {row['lorafuse_ms']:.1f} | {ratio} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
