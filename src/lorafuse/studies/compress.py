"""Delta compression on the skill world: full fine-tunes of the base, compressed by every method.

For each task skill, the world's base is fully fine-tuned (all parameters) on the skill's train
split with the shared training loop, and cached. Its delta is then compressed by every method at
every budget, with calibration Hessians from 128 seeded training examples read by the fine-tuned
model; changed non-linear tensors (the tied embedding, the norms) are stored as plain deltas, so
the methods differ only on the attention/MLP projections. Each compressed model is scored by
exact match on the skill's test split, served the way the library serves it: low-rank kinds as
a LoRA through the bank (``ΔŴ`` never formed), dense kinds added to the weights.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lorafuse._data import encode_examples
from lorafuse._hf import load_model
from lorafuse._io import atomic_output_dir, versions
from lorafuse.compress import (
    activation_error,
    apply_delta,
    collect_hessians,
    compress_checkpoint,
    distill_scales,
)
from lorafuse.errors import BudgetError
from lorafuse.eval import evaluate
from lorafuse.runtime import attach, detach
from lorafuse.skillworld.build import world_home
from lorafuse.skillworld.data import read_jsonl
from lorafuse.skillworld.evaluate import load_world
from lorafuse.train.loop import TrainConfig, train_loop

# (row label, method, settings, BitDelta scale-distillation steps)
VARIANTS: list[tuple[str, str, dict[str, Any], int]] = [
    ("delta-come (best of both + low-rank, GPTQ)", "delta-come", {}, 0),
    ("delta-come (8:2,3:32,2:*, GPTQ)", "delta-come", {"schedule": "paper"}, 0),
    ("delta-come (auto, GPTQ)", "delta-come", {"schedule": "auto"}, 0),
    ("delta-come (8:2,3:32,2:*, RTN)", "delta-come", {"schedule": "paper", "quantizer": "rtn"}, 0),
    ("low-rank (fp16)", "low-rank", {}, 0),
    ("bitdelta", "bitdelta", {}, 0),
    ("bitdelta + scale distillation", "bitdelta", {}, 200),
    ("rtn (dense)", "rtn", {}, 0),
]
CALIB_SAMPLES = 128


def finetune(root: Path, skill: str, config: TrainConfig, out: Path, progress: bool = True) -> Path:
    """Full fine-tune of the world's base on ``skill`` (cached in ``out`` with its settings)."""
    record = out / "finetune.json"
    if record.exists() and json.loads(record.read_text()).get("config") == asdict(config):
        return out
    tokenizer, model = load_world(root)
    torch.manual_seed(config.seed)
    rows = read_jsonl(root / "data" / skill / "train.jsonl")
    started = time.perf_counter()
    losses = train_loop(
        model,
        model.parameters(),
        encode_examples(tokenizer, rows),
        config,
        pad_id=tokenizer.pad_token_id,
        desc=f"full fine-tune {skill}",
        progress=progress,
    )
    with atomic_output_dir(out, inputs={"world": root}) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        info = {
            "skill": skill,
            "config": asdict(config),
            "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "seconds": round(time.perf_counter() - started, 1),
            "versions": versions(),
        }
        (tmp / "finetune.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def compress_study(
    root: Path,
    *,
    skills: list[str],
    budgets: list[str],
    steps: int = 600,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(seed)
    config = TrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup=0.05, seed=seed)
    cache = world_home().parent / "compress-study" / f"{root.name}-steps{steps}"
    tokenizer, base = load_world(root)
    results: dict[str, Any] = {}
    for skill in skills:
        ft_dir = finetune(root, skill, config, cache / skill, progress)
        tests = read_jsonl(root / "data" / skill / "test.jsonl")[:limit]
        train = read_jsonl(root / "data" / skill / "train.jsonl")
        calib_rows = random.Random(seed).sample(train, min(CALIB_SAMPLES, len(train)))
        ft = load_model(ft_dir)
        calib = [torch.tensor(ids) for ids, _ in encode_examples(tokenizer, calib_rows)]
        hessians = collect_hessians(ft, calib, progress=False)
        rows: dict[str, Any] = {
            "base": {"accuracy": score(base, tokenizer, tests)},
            "fine-tuned": {"accuracy": score(ft, tokenizer, tests)},
            "fine-tuned projections only (embedding, norms from the base)": {
                "accuracy": score(with_projections_of(copy.deepcopy(base), ft), tokenizer, tests)
            },
        }
        sizes: dict[str, int] = {}
        bar = tqdm(total=len(budgets) * len(VARIANTS), desc=f"compress {skill}", disable=not progress)
        for budget in budgets:
            for label, method, settings, distill_steps in VARIANTS:
                bar.update()
                t0 = time.perf_counter()
                try:
                    cd = compress_checkpoint(
                        root / "base",
                        ft_dir,
                        method=method,
                        budget=budget,
                        hessians=hessians,
                        keep_other="delta",
                        params=settings,
                        progress=False,
                    )
                except BudgetError as exc:
                    rows[f"{label} @ {budget}"] = {"skipped": str(exc).split(": ", 1)[-1]}
                    continue
                if distill_steps:  # BitDelta's recipe: 200 steps, batch 4, lr 1e-4
                    student = apply_delta(copy.deepcopy(base), cd, linear=False)
                    cd = distill_scales(
                        student, ft, cd, calib, steps=distill_steps, seed=seed, progress=False
                    )
                seconds = time.perf_counter() - t0
                sizes["fp16"] = cd.fp16_nbytes
                sizes["other"] = sum(4 * t.numel() for t in cd.other.values())
                model = copy.deepcopy(base)
                apply_delta(model, cd, linear=False)  # embedding and norms: plain deltas
                if cd.factored:
                    attach(model, [cd.to_lora()])
                else:
                    apply_delta(model, cd, other=False)
                weight_err, act_err = errors(cd, base, ft, hessians)
                rows[f"{label} @ {budget}"] = {
                    "accuracy": score(model, tokenizer, tests),
                    "nbytes": cd.nbytes,
                    "ratio": cd.nbytes / cd.fp16_nbytes,
                    "activation_error": act_err,
                    "weight_error": weight_err,
                    "compress_seconds": round(seconds, 2),
                }
                detach(model)
        bar.close()
        results[skill] = {
            "rows": rows,
            "fp16_delta_bytes": sizes.get("fp16"),
            "other_delta_bytes_fp32": sizes.get("other"),
            "finetune": json.loads((ft_dir / "finetune.json").read_text()),
            "n_test": len(tests),
        }
    return {
        "metric": "exact match (%) on the test split; errors are means over the 28 projections",
        "budgets": budgets,
        "seed": seed,
        "calibration_samples": CALIB_SAMPLES,
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
        "versions": versions(),
        "threads": torch.get_num_threads(),
    }


@torch.no_grad()
def errors(
    cd: Any, base: torch.nn.Module, ft: torch.nn.Module, hessians: dict[str, torch.Tensor]
) -> tuple[float, float]:
    """Mean over the projections of the weight and calibration-activation errors of ``ΔŴ``."""
    weight, act = [], []
    for path, module in cd.modules.items():
        delta = ft.get_parameter(f"{path}.weight") - base.get_parameter(f"{path}.weight")  # (out, in)
        approx = module.delta()
        weight.append(float((approx - delta).norm() / delta.norm()))
        act.append(activation_error(delta, approx, hessians[path]))
    return sum(weight) / len(weight), sum(act) / len(act)


def score(model: torch.nn.Module, tokenizer: Any, tests: list[dict[str, str]]) -> float:
    return round(evaluate(model, tokenizer, tests)["exact_match"], 1)


@torch.no_grad()
def with_projections_of(model: torch.nn.Module, finetuned: torch.nn.Module) -> torch.nn.Module:
    """``model`` with ``finetuned``'s attention/MLP projections, every other tensor unchanged."""
    ft_params = dict(finetuned.named_parameters())
    for name, p in model.named_parameters():
        if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
            p.copy_(ft_params[name])
    return model


def format_compress_study(result: dict[str, Any]) -> str:
    """Markdown: per skill, accuracy, size and errors of every method at every budget."""
    lines = []
    for skill, r in result["results"].items():
        fp16, ft = r["fp16_delta_bytes"] or 0, r["finetune"]
        lines += [
            f"**{skill}** (test n={r['n_test']}; fp16 delta of the 28 projections: {fp16:,} bytes; "
            f"fine-tune: {ft['config']['steps']} steps, final loss {ft['final_loss']:.3f})",
            "",
            "| model | exact match % | bytes (projections) | × fp16 | activation error | weight error |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for label, row in r["rows"].items():
            if "skipped" in row:
                lines.append(f"| {label} | — | — | — | — | not run: {row['skipped']} |")
            elif "nbytes" in row:
                lines.append(
                    f"| {label} | {row['accuracy']:.1f} | {row['nbytes']:,} | {row['ratio']:.4f} | "
                    f"{row['activation_error']:.3f} | {row['weight_error']:.3f} |"
                )
            else:
                lines.append(f"| {label} | {row['accuracy']:.1f} | | | | |")
        lines.append("")
    return "\n".join(lines)
