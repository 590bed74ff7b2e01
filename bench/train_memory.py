"""Training LoRA-Flow gates vs a PEFT LoRA on a real model: peak memory and step time.

Same base (default SmolLM2-135M-Instruct, prepared by ``lorafuse models prepare smollm2``), same
batch (``--batch`` rows of ``--tokens`` tokens), same optimizer (AdamW), same process type: each
case runs in its own spawned child so that its peak resident memory (sampled every 2 ms, minus the
child's start after loading the model) is its own. Cases:

- ``peft-lora``: a fresh PEFT LoRA (rank 8 on q/v) trained (what a user would otherwise do);
- ``lora-flow``: two frozen rank-8 q/v LoRAs in the bank, LoRA-Flow's per-layer gates trained;

each with and without ``--gradient-checkpointing`` of the frozen base. One warm-up step, then
``--reps`` timed steps; the median and every repetition are written to
``bench/results/<name>.json`` and a Markdown table.

Usage: ``python bench/train_memory.py [--reps 5] [--batch 4] [--tokens 128] [--threads 2]
[--model DIR] [--name train_memory]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import PeakSampler, run_in_child

RESULTS = Path(__file__).parent / "results"
QV = ["q_proj", "v_proj"]


def child(model_dir: str, case: str, checkpointing: bool, args: dict, queue) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(args["threads"])
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafuse import attach, load_lora
    from lorafuse.fusion import flow_for
    from lorafuse.tiny import random_peft_adapter
    from lorafuse.train.loop import gradient_checkpointing

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args["batch"], args["tokens"]), generator=g)
    if case == "peft-lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=QV, lora_dropout=0.0))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            loras = [
                load_lora(random_peft_adapter(model, Path(tmp) / f"l{i}", seed=i, r=8, target_modules=QV))
                for i in range(2)
            ]
        flow = flow_for(attach(model, loras))
        params = list(flow.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    with gradient_checkpointing(model, checkpointing), PeakSampler() as sampler:
        step()  # warm-up (AdamW state allocated here)
        for _ in range(args["reps"]):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    queue.put(
        {
            "case": case,
            "gradient_checkpointing": checkpointing,
            "trainable_params": sum(p.numel() for p in params),
            "step_s": times,
            "median_step_s": statistics.median(times),
            "peak_extra_mib": round(sampler.extra, 1),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="HF folder [default: prepared SmolLM2]")
    parser.add_argument("--name", default="train_memory")
    args = parser.parse_args()
    if args.model is None:
        from lorafuse.models import prepare

        args.model = str(prepare("smollm2"))
    settings = {"reps": args.reps, "batch": args.batch, "tokens": args.tokens, "threads": args.threads}
    rows = []
    for checkpointing in (False, True):
        for case in ("peft-lora", "lora-flow"):
            rows.append(run_in_child(child, args.model, case, checkpointing, settings))
            print(json.dumps(rows[-1]), flush=True)
    meta = {
        "command": "python bench/train_memory.py " + " ".join(os.sys.argv[1:]),
        "model": args.model,
        **settings,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"Training on {Path(args.model).name}, batch {args.batch}×{args.tokens}, {args.threads} thread(s), "
        f"CPU, fp32; median of {args.reps} steps after a warm-up",
        "",
        "| case | gradient checkpointing | trainable params | step s | peak extra MiB |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {'yes' if r['gradient_checkpointing'] else 'no'} | {r['trainable_params']:,} | "
            f"{r['median_step_s']:.2f} | {r['peak_extra_mib']:,.0f} |"
        )
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
