"""How fast and how accurate is lorafuse's merge next to PEFT's add_weighted_adapter at 7B shapes?

Same random LoRAs for both (4 adapters, rank 16, Llama-2-7B shapes: attention 4096×4096, MLP
11008×4096 and 4096×11008), methods ``svd`` and ``ties_svd`` (lorafuse: ``svd`` and ``ties``
with rank 16, density 0.5). Per module kind and method, each system runs in its own child
process, which reports:

- time per merge (lorafuse: 1 warm-up + ``--reps``; PEFT: ``--peft-reps`` without warm-up, since
  one PEFT ``svd`` merge of a 7B layer takes minutes here and its cost does not warm up);
- peak extra resident memory during the timed merges (sampled every 2 ms, minus the start), MiB;
- the relative ``ΔW`` error ``‖ΔW_merged − T‖_F / ‖T‖_F`` against the target ``T`` (the exact
  ``Σ w_i ΔW_i`` for svd; the dense TIES result for ties), and the optimum (Eckart–Young) for svd.

Per-layer figures = 4 × attention + 3 × MLP (q, k, v, o; gate, up, down).
Usage: ``python bench/merge_7b.py [--reps 5] [--peft-reps 3] [--quick]``; writes
``bench/results/merge_7b.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path

import peft
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import merge_utils
from torch import nn

from _common import PeakSampler

RESULTS = Path(__file__).parent / "results"
N_LORAS, RANK, DENSITY = 4, 16, 0.5
WEIGHTS = [1.0, 0.8, 0.6, 0.4]


def make_factors(out_dim: int, in_dim: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(RANK, in_dim, generator=g) * 0.02, torch.randn(out_dim, RANK, generator=g) * 0.02, 2.0)
        for _ in range(N_LORAS)
    ]


def target(factors: list, method: str) -> torch.Tensor:
    deltas = [s * (B @ A) for A, B, s in factors]
    if method == "svd":
        return sum(w * d for w, d in zip(WEIGHTS, deltas, strict=True))
    return merge_utils.ties(deltas, torch.tensor(WEIGHTS), DENSITY, "total")


class Holder(nn.Module):
    def __init__(self, out_dim: int, in_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=False)


def run_peft(out_dim: int, in_dim: int, method: str, reps: int, seed: int, queue: mp.Queue) -> None:
    torch.manual_seed(seed)
    factors = make_factors(out_dim, in_dim, seed)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["proj"])
    model = get_peft_model(Holder(out_dim, in_dim), config, adapter_name="a0")
    for i in range(1, N_LORAS):
        model.add_adapter(f"a{i}", config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for i, (A, B, _) in enumerate(factors):
            layer.lora_A[f"a{i}"].weight.copy_(A)
            layer.lora_B[f"a{i}"].weight.copy_(B)
    names = [f"a{i}" for i in range(N_LORAS)]
    combination = "svd" if method == "svd" else "ties_svd"
    extra = {} if method == "svd" else {"density": DENSITY}
    times = []
    with PeakSampler() as memory:
        for rep in range(reps):
            if rep:
                model.delete_adapter("m")
            start = time.perf_counter()
            model.add_weighted_adapter(
                names, WEIGHTS, "m", combination_type=combination, svd_rank=RANK, **extra
            )
            times.append(time.perf_counter() - start)
    merged = layer.get_delta_weight("m").detach().clone()
    queue.put({"times": times, "peak_extra_mib": memory.extra, "merged": merged.numpy()})


def run_ours(out_dim: int, in_dim: int, method: str, reps: int, seed: int, queue: mp.Queue) -> None:
    from lorafuse import LoRA, LoRAModule, merge

    torch.manual_seed(seed)
    factors = make_factors(out_dim, in_dim, seed)
    loras = [LoRA({"proj": LoRAModule(A, B, s)}, name=f"a{i}") for i, (A, B, s) in enumerate(factors)]
    ours = "svd" if method == "svd" else "ties"
    extra = {} if method == "svd" else {"density": DENSITY}
    merge(loras, ours, WEIGHTS, RANK, progress=False, **extra)  # warm-up
    times = []
    with PeakSampler() as memory:
        for _ in range(reps):
            start = time.perf_counter()
            merged = merge(loras, ours, WEIGHTS, RANK, progress=False, **extra)
            times.append(time.perf_counter() - start)
    queue.put({"times": times, "peak_extra_mib": memory.extra, "merged": merged["proj"].delta().numpy()})


def measure(system: str, shape: tuple[int, int], method: str, reps: int, seed: int) -> dict:
    ctx = mp.get_context("spawn")  # fork after torch threads start can deadlock
    queue = ctx.Queue()
    worker = run_peft if system == "peft" else run_ours
    proc = ctx.Process(target=worker, args=(*shape, method, reps, seed, queue))
    proc.start()
    result = queue.get()
    proc.join()
    merged = torch.from_numpy(result.pop("merged"))
    want = target(make_factors(*shape, seed), method)
    result["rel_error"] = ((merged - want).norm() / want.norm()).item()
    if method == "svd":
        sigma = torch.linalg.svdvals(want)
        result["optimal_rel_error"] = (
            sigma[RANK:].square().sum().sqrt() / sigma.square().sum().sqrt()
        ).item()
    result["median_s"] = statistics.median(result["times"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--peft-reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1024/2752 shapes, for a smoke run")
    args = parser.parse_args()
    hidden, mlp = (1024, 2752) if args.quick else (4096, 11008)
    kinds = {
        f"attention ({hidden}×{hidden})": ((hidden, hidden), 4),
        f"mlp ({mlp}×{hidden})": ((mlp, hidden), 3),
    }
    rows = []
    for method in ("svd", "ties"):
        for kind, (shape, count) in kinds.items():
            peft_result = measure("peft", shape, method, args.peft_reps, args.seed)
            ours_result = measure("lorafuse", shape, method, args.reps, args.seed)
            rows.append(
                {
                    "method": method,
                    "module": kind,
                    "per_layer": count,
                    "peft": peft_result,
                    "lorafuse": ours_result,
                }
            )
            print(
                method,
                kind,
                f"peft {peft_result['median_s']:.2f}s",
                f"ours {ours_result['median_s']:.3f}s",
                flush=True,
            )

    layer = {}
    for method in ("svd", "ties"):
        sel = [r for r in rows if r["method"] == method]
        layer[method] = {s: sum(r[s]["median_s"] * r["per_layer"] for r in sel) for s in ("peft", "lorafuse")}
    record = {
        "question": "merge time, memory and ΔW error: lorafuse vs PEFT add_weighted_adapter at Llama-2-7B shapes",  # noqa: E501
        "loras": N_LORAS,
        "rank": RANK,
        "weights": WEIGHTS,
        "density": DENSITY,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "peft": peft.__version__,
        },
        "seed": args.seed,
        "rows": rows,
        "per_layer_seconds": layer,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = "merge_7b" + ("-quick" if args.quick else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"Merge of {N_LORAS} LoRAs (rank {RANK}) to rank {RANK}, {torch.get_num_threads()} threads; "
        f"median s (lorafuse {args.reps} reps after a warm-up, PEFT {args.peft_reps} reps)",
        "",
        "| method | module | PEFT s | lorafuse s | speed-up | PEFT peak MiB | lorafuse peak MiB | PEFT ΔW err | lorafuse ΔW err | optimum |",  # noqa: E501
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        p, o = r["peft"], r["lorafuse"]
        optimum = f"{o['optimal_rel_error']:.4f}" if "optimal_rel_error" in o else "—"
        lines.append(
            f"| {r['method']} | {r['module']} | {p['median_s']:.2f} | {o['median_s']:.3f} | "
            f"{p['median_s'] / o['median_s']:.0f}× | {p['peak_extra_mib']:.0f} | {o['peak_extra_mib']:.0f} | "
            f"{p['rel_error']:.4f} | {o['rel_error']:.4f} | {optimum} |"
        )
    for method, v in layer.items():
        lines.append(
            f"| {method} | **one layer (4 attn + 3 MLP)** | {v['peft']:.1f} | {v['lorafuse']:.2f} | "
            f"{v['peft'] / v['lorafuse']:.0f}× | | | | | |"
        )
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
