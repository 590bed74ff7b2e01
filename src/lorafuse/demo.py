"""The main job for now: build a small base model and three PEFT adapters, then run the bank.

It checks, on a real ``LlamaForCausalLM`` loaded with ``AutoModelForCausalLM`` from a folder and
adapters written by PEFT itself, what the runtime promises (README, "The bank runtime"):

1. weight 1 on one LoRA gives PEFT's logits for that adapter;
2. weights ``w`` give the logits of PEFT's ``cat`` merge with the same weights;
3. one batch whose rows use different adapters generates (greedy, KV cache) the same tokens as
   PEFT's mixed-batch ``generate(adapter_names=...)``;
4. ``detach`` restores the base bit for bit.

Later issues replace this with the composition study on the skill world.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from tqdm import tqdm

from lorafuse._hf import load_model
from lorafuse._io import lorafuse_home, write_text_atomic
from lorafuse.adapters import load_lora
from lorafuse.runtime import attach, detach
from lorafuse.tiny import random_peft_adapter, save_model, tiny_llama

ADAPTERS = {"lang": 4, "math": 8, "code": 16}  # name → rank


@dataclass
class DemoCheck:
    name: str
    value: float
    threshold: float

    @property
    def ok(self) -> bool:
        return self.value <= self.threshold


def default_dir() -> Path:
    return lorafuse_home() / "demo"


def run_demo(out_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """Build the demo models in ``out_dir`` (default ``$LORAFUSE_HOME/demo``) and run the checks."""
    root = Path(out_dir) if out_dir else default_dir()
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    steps = tqdm(total=6, desc="demo", unit="step")

    base_dir = root / "base"
    if not (base_dir / "config.json").is_file():
        save_model(tiny_llama(seed, hidden_size=64, num_layers=4, intermediate_size=128), base_dir)
    steps.update()
    model = load_model(base_dir)
    for i, (name, rank) in enumerate(ADAPTERS.items()):
        if not (root / name / "adapter_config.json").is_file():
            random_peft_adapter(model, root / name, seed=seed + 1 + i, r=rank, lora_alpha=2 * rank)
    loras = {name: load_lora(root / name) for name in ADAPTERS}
    steps.update()

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (3, 12), generator=generator)  # (B, T)
    names = list(ADAPTERS)
    peft = PeftModel.from_pretrained(copy.deepcopy(model), root / names[0], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(root / name, adapter_name=name)
    peft.eval()
    with torch.no_grad():
        base_logits = model(ids).logits  # (B, T, V)
        bank = attach(model, loras)
        single = 0.0
        for i, name in enumerate(names):
            peft.set_adapter(name)
            reference = peft(ids).logits
            bank.set_weights(torch.eye(len(names))[i])
            single = max(single, (model(ids).logits - reference).abs().max().item())
        steps.update()

        weights = [0.7, -0.4, 1.3]
        peft.add_weighted_adapter(names, weights, "cat_merge", combination_type="cat")
        peft.set_adapter("cat_merge")
        bank.set_weights(weights)
        cat_diff = (model(ids).logits - peft(ids).logits).abs().max().item()
        steps.update()

        prompt = ids[:, :6]
        bank.set_weights(torch.eye(len(names)))  # row i uses adapter i: (B, k)
        ours = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
        theirs = peft.generate(
            input_ids=prompt,
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=0,
            adapter_names=names,
        )
        mismatched = float((ours != theirs).sum().item())
        steps.update()

        detach(model)
        restored = (model(ids).logits - base_logits).abs().max().item()
        steps.update()
    steps.close()

    checks = [
        DemoCheck("max |logits − PEFT| (one adapter, weight 1)", single, 1e-5),
        DemoCheck("max |logits − PEFT cat merge| (w = 0.7, −0.4, 1.3)", cat_diff, 1e-5),
        DemoCheck("generated tokens differing from PEFT mixed batch", mismatched, 0.0),
        DemoCheck("max |logits − base| after detach", restored, 0.0),
    ]
    return {
        "seed": seed,
        "dir": str(root),
        "seconds": round(time.perf_counter() - started, 2),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "adapters": {name: rank for name, rank in ADAPTERS.items()},
        "checks": [{"name": c.name, "value": c.value, "threshold": c.threshold, "ok": c.ok} for c in checks],
        "ok": all(c.ok for c in checks),
    }


def format_demo(result: dict[str, Any]) -> str:
    lines = [f"bank check: the LoRA bank vs PEFT on a tiny Llama + 3 PEFT adapters in {result['dir']}", ""]
    for check in result["checks"]:
        status = "ok  " if check["ok"] else "FAIL"
        lines.append(f"  [{status}] {check['name']:<55} {check['value']:.3g} (≤ {check['threshold']:g})")
    lines.append("")
    lines.append(f"{'all checks passed' if result['ok'] else 'SOME CHECKS FAILED'} in {result['seconds']} s")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``result`` as JSON to ``path`` atomically (mode from the umask)."""
    write_text_atomic(path, json.dumps(result, indent=2))
