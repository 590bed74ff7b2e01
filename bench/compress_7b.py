"""Compressing one Llama-2-7B-shaped layer: time, peak memory and error of each method at one budget.

One attention projection (4096×4096, ``q_proj``) and one MLP projection (``up_proj``: 11008 out,
4096 in) with a random delta of long-tailed spectrum ``ΔW = G_u diag(σ) G_vᵀ``, ``σ_i ∝ i^-0.6``
(``G`` Gaussian, columns of unit norm in expectation), and calibration inputs with correlated
channels (``X = Z M + 0.1 N``, ``Z`` of rank 256, plus 1 % outlier channels ×10), ``H = XᵀX/n``
(``n`` = 2048 tokens). Every method compresses the same delta at the same budget
(``--budgets``, default 1/16 and 1/32). Each (shape, method, budget) runs in its own child
process, which reports:

- time per compression: one warm-up on a 512×512 delta of the same method, then ``--reps``
  repetitions (``--svd-reps`` for the SVD methods, whose full fp32 SVD dominates), median;
- peak extra resident memory during the timed runs (sampled every 2 ms, minus the start), MiB;
- exact bytes (scales, zero points, permutations counted) and their ratio to fp16;
- errors: weight ``‖ΔŴ − ΔW‖_F / ‖ΔW‖_F`` and activation ``√(tr(E H Eᵀ) / tr(ΔW H ΔWᵀ))``.

Usage: ``python bench/compress_7b.py [--reps 5] [--svd-reps 3] [--threads 1] [--budgets 1/16,1/32]
[--shapes attention,mlp] [--name compress_7b] [--slow-last LABELS] [--quick]``; writes
``bench/results/<name>.json`` and ``.md`` after every measurement (the ``--slow-last`` variants,
by default ``delta-come (auto, GPTQ)``, are measured after all the others).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from _common import PeakSampler, run_in_child

RESULTS = Path(__file__).parent / "results"
SHAPES = {"attention q_proj (4096×4096)": (4096, 4096), "mlp up_proj (11008×4096)": (11008, 4096)}
VARIANTS = {  # label → (method, settings)
    "delta-come (best, GPTQ)": ("delta-come", {}),
    "delta-come (8:2,3:32,2:*, GPTQ)": ("delta-come", {"schedule": "paper"}),
    "delta-come (auto, GPTQ)": ("delta-come", {"schedule": "auto"}),
    "delta-come (8:2,3:32,2:*, RTN)": ("delta-come", {"schedule": "paper", "quantizer": "rtn"}),
    "low-rank (fp16)": ("low-rank", {}),
    "bitdelta": ("bitdelta", {}),
    "rtn (dense)": ("rtn", {}),
}


def make_inputs(out_dim: int, in_dim: int, seed: int, tokens: int = 2048) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = min(out_dim, in_dim)
    sigma = torch.arange(1, r + 1, dtype=torch.float32) ** -0.6  # (r,)
    Gu = torch.randn(out_dim, r, generator=g) / out_dim**0.5  # (out, r)
    Gv = torch.randn(in_dim, r, generator=g) / in_dim**0.5  # (in, r)
    delta = 1e-2 * (Gu * sigma) @ Gv.T  # (out, in)
    X = torch.randn(tokens, 256, generator=g) @ torch.randn(256, in_dim, generator=g) / 16
    X += 0.1 * torch.randn(tokens, in_dim, generator=g)
    X[:, torch.randperm(in_dim, generator=g)[: in_dim // 100]] *= 10  # outlier channels
    return {"delta": delta.contiguous(), "H": (X.T @ X / tokens).contiguous()}


def child(
    path: str, method: str, settings: dict, budget: str, reps: int, threads: int, queue: mp.Queue
) -> None:
    torch.set_num_threads(threads)
    from lorafuse.compress import activation_error, budget_nbytes, get_method, parse_budget

    spec = get_method(method)
    params = spec.params(**settings)
    data = load_file(path)
    delta, H = data["delta"], data["H"]
    ratio = parse_budget(budget)
    allowed = budget_nbytes(*delta.shape, ratio)
    small = make_inputs(512, 512, 1, tokens=512)
    spec.fn(small["delta"], small["H"], budget_nbytes(512, 512, ratio), params, "warm-up")
    times = []
    with PeakSampler() as sampler:
        for _ in range(max(reps, 1)):
            t0 = time.perf_counter()
            module = spec.fn(delta, H, allowed, params, "bench")
            times.append(time.perf_counter() - t0)
    approx = module.delta()
    queue.put(
        {
            "times_s": times,
            "median_s": statistics.median(times),
            "peak_extra_mib": round(sampler.extra, 1),
            "nbytes": module.nbytes,
            "segments": getattr(module, "segments", None),
            "choice": getattr(module, "label", None),  # what the ``best`` schedule kept
            "budget_nbytes": allowed,
            "weight_error": float((approx - delta).norm() / delta.norm()),
            "activation_error": activation_error(delta, approx, H),
        }
    )


def measure(path: str, method: str, settings: dict, budget: str, reps: int, threads: int) -> dict:
    return run_in_child(child, path, method, settings, budget, reps, threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--svd-reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budgets", default="1/16,1/32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shapes", default="attention,mlp", help="attention and/or mlp")
    parser.add_argument("--name", default="compress_7b", help="file name stem in bench/results/")
    parser.add_argument(
        "--slow-last",
        default="delta-come (auto, GPTQ)",
        help="variants measured after all the others (labels separated by ';')",
    )
    parser.add_argument("--quick", action="store_true", help="1024×1024 and 2752×1024 instead (a smoke run)")
    parser.add_argument("--variants", default=None, help="only these variants (labels separated by ';')")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = (
        SHAPES if not args.quick else {"attention (1024×1024)": (1024, 1024), "mlp (2752×1024)": (2752, 1024)}
    )
    shapes = {k: v for k, v in shapes.items() if k.split()[0] in args.shapes.split(",")}
    budgets = [b.strip() for b in args.budgets.split(",")]
    slow = [v.strip() for v in args.slow_last.split(";") if v.strip()]
    wanted = [v.strip() for v in args.variants.split(";")] if args.variants else list(VARIANTS)
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    passes = [[v for v in wanted if v not in slow], [v for v in wanted if v in slow]]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for names in passes:
            for label, (out_dim, in_dim) in shapes.items():
                path = str(Path(tmp) / f"{out_dim}x{in_dim}.safetensors")
                if not Path(path).exists():
                    save_file(make_inputs(out_dim, in_dim, args.seed), path)
                for budget in budgets:
                    for name in names:
                        method, settings = VARIANTS[name]
                        row = {"shape": label, "dims": [out_dim, in_dim], "budget": budget, "method": name}
                        if method in ("bitdelta", "rtn") and Fraction(budget) < Fraction(1, 16):
                            rows.append({**row, "skipped": "needs ≥ 1/16"})
                            continue
                        reps = args.svd_reps if method in ("delta-come", "low-rank") else args.reps
                        print(f"{label} {budget} {name} ...", flush=True)
                        result = measure(path, method, settings, budget, reps, args.threads)
                        rows.append({**row, **result})
                        print(f"  {result['median_s']:.2f} s, {result['activation_error']:.4f}", flush=True)
                        write(args, rows)  # after every row: a long run leaves what it measured


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    """The JSON record and the Markdown table of the rows measured so far."""
    record = {
        "question": "compression time, peak memory and error per method, one Llama-2-7B-shaped layer",
        "threads": args.threads,
        "reps": args.reps,
        "svd_reps": args.svd_reps,
        "seed": args.seed,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = args.name + ("-quick" if args.quick else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"Compressing one 7B-shaped layer, {args.threads} thread(s), CPU; median of {args.svd_reps} "
        f"(SVD methods) or {args.reps} (others) after a warm-up",
        "",
        "| layer | budget | method | time s | peak extra MiB | bytes | × fp16 | weight err | act. err |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = {name: i for i, name in enumerate(VARIANTS)}
    for r in sorted(rows, key=lambda r: (r["shape"], r["budget"], order[r["method"]])):
        if "skipped" in r:
            lines.append(
                f"| {r['shape']} | {r['budget']} | {r['method']} | — | — | — | — | {r['skipped']} | |"
            )
            continue
        ratio = f"{r['nbytes'] / (2 * r['dims'][0] * r['dims'][1]):.4f}"
        lines.append(
            f"| {r['shape']} | {r['budget']} | {r['method']}"
            + (f" → kept {r['choice']}" if r.get("choice") and "best" in r["method"] else "")
            + f" | {r['median_s']:.2f} | "
            f"{r['peak_extra_mib']:.0f} | {r['nbytes']:,} | {ratio} | {r['weight_error']:.4f} | "
            f"{r['activation_error']:.4f} |"
        )
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
