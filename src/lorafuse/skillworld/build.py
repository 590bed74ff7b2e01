"""Build the skill world: data, tokenizer, base model, skill/pool LoRAs and oracle LoRAs.

Everything is derived from ``seed`` and a profile and written atomically into one folder with a
``manifest.json`` (seed, profile, versions, SHA-256 of every file). A complete build is reused;
an incomplete or damaged one is rebuilt.

Layout::

    <world>/manifest.json
    <world>/data/<task>/{train,dev,test}.jsonl   (+ oracle_train.jsonl for composites)
    <world>/data/pretrain.txt, data/languages.json
    <world>/tokenizer/        AutoTokenizer.from_pretrained
    <world>/base/             AutoModelForCausalLM.from_pretrained (a LlamaForCausalLM)
    <world>/loras/<task>/     PeftModel.from_pretrained (skills, pool and oracle_<composite>)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from lorafuse._data import encode_examples, encode_text
from lorafuse._io import atomic_output_dir, lorafuse_home, recover_leftovers, versions
from lorafuse.errors import OutputExistsError
from lorafuse.fuse.loop import TrainConfig, train_loop
from lorafuse.skillworld.data import COMPOSITES, POOL, SKILLS, DataSizes, read_jsonl, write_world_data
from lorafuse.skillworld.tokenizer import build_tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Profile:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    sizes: DataSizes
    pretrain: TrainConfig
    skill_lora: TrainConfig
    pool_lora: TrainConfig
    oracle_lora: TrainConfig
    lora_rank: int
    lora_alpha: int
    threads: int = 2
    lora_steps: dict[str, int] = field(default_factory=dict)  # per-task overrides of the step count


PROFILES: dict[str, Profile] = {
    "default": Profile(
        "default",
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        intermediate_size=384,
        sizes=DataSizes(
            skill_train=3000,
            skill_dev=100,
            skill_test=300,
            composite_test=500,
            oracle_train=5000,
            pretrain_lines=40000,
        ),
        pretrain=TrainConfig(steps=2000, batch_size=64, lr=3e-3, warmup=0.05, weight_decay=0.01),
        skill_lora=TrainConfig(steps=600, batch_size=32, lr=4e-3, warmup=0.05),
        pool_lora=TrainConfig(steps=250, batch_size=32, lr=4e-3, warmup=0.05),
        oracle_lora=TrainConfig(steps=600, batch_size=32, lr=4e-3, warmup=0.05),
        lora_rank=16,
        lora_alpha=32,
        # Translation is the slowest skill to learn: at 600 steps lang_vell reached 66% exact match.
        lora_steps={"lang_zorb": 1000, "lang_vell": 1000},
    ),
    "tiny": Profile(
        "tiny",
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        sizes=DataSizes(
            skill_train=200,
            skill_dev=20,
            skill_test=20,
            composite_test=20,
            oracle_train=200,
            pretrain_lines=500,
            composite_train=200,
            composite_dev=20,
        ),
        pretrain=TrainConfig(steps=20, batch_size=16, lr=3e-3),
        skill_lora=TrainConfig(steps=5, batch_size=8, lr=3e-3),
        pool_lora=TrainConfig(steps=3, batch_size=8, lr=3e-3),
        oracle_lora=TrainConfig(steps=5, batch_size=8, lr=3e-3),
        lora_rank=4,
        lora_alpha=8,
    ),
}


def world_home() -> Path:
    return lorafuse_home() / "world"


def default_world_dir(profile: str = "default", seed: int = 0) -> Path:
    return world_home() / f"{profile}-seed{seed}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): _sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(root: Path, profile: str, seed: int) -> bool:
    """A finished build of this profile and seed whose files all match their recorded hashes."""
    manifest = read_manifest(root)
    if not manifest or manifest.get("format") != FORMAT_VERSION:
        return False
    if manifest.get("profile") != profile or manifest.get("seed") != seed:
        return False
    recorded = manifest.get("files", {})
    return bool(recorded) and all(
        (root / rel).is_file() and _sha256(root / rel) == h for rel, h in recorded.items()
    )


def _base_model(profile: Profile, vocab_size: int, tokenizer) -> LlamaForCausalLM:  # type: ignore[no-untyped-def]
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=profile.hidden_size,
        intermediate_size=profile.intermediate_size,
        num_hidden_layers=profile.num_layers,
        num_attention_heads=profile.num_heads,
        num_key_value_heads=profile.num_heads,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def train_lora(
    base: LlamaForCausalLM,
    tokenizer,
    rows: list[dict[str, str]],
    config: TrainConfig,
    profile: Profile,
    out: Path,
    desc: str,  # type: ignore[no-untyped-def]
) -> list[float]:
    """Train a PEFT LoRA (all 7 projections) on ``rows`` and save it to ``out``."""
    torch.manual_seed(config.seed)
    lora_config = LoraConfig(
        r=profile.lora_rank,
        lora_alpha=profile.lora_alpha,
        target_modules=TARGETS,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(base), lora_config)
    losses = train_loop(
        model,
        model.parameters(),
        encode_examples(tokenizer, rows),
        config,
        pad_id=tokenizer.pad_token_id,
        desc=desc,
    )
    model.save_pretrained(str(out))
    return losses


def build_world(
    root: str | os.PathLike[str] | None = None,
    *,
    profile: str = "default",
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Build (or reuse) the skill world for ``profile`` and ``seed``; returns its folder.

    A folder that exists, is not empty and holds no world (no ``manifest.json``) is only replaced
    with ``force``; without it :class:`OutputExistsError` is raised before any work.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    spec = PROFILES[profile]
    out = Path(root) if root else default_world_dir(profile, seed)
    recover_leftovers(out)  # a world whose replace was interrupted is restored, then reused
    if not force and is_complete(out, profile, seed):
        return out
    if not force and out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise OutputExistsError(
            f"{out}: exists and is not a skill world (no {MANIFEST}); choose another --dir, or "
            "replace it with `lorafuse world build --dir ... --force`"
        )
    torch.set_num_threads(spec.threads)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    losses: dict[str, float] = {}
    lora_tasks = [*SKILLS, *POOL, *(f"oracle_{c}" for c in COMPOSITES)]
    bar = tqdm(total=3 + len(lora_tasks), desc=f"world ({profile})", unit="part", disable=not progress)
    with atomic_output_dir(out) as tmp:
        write_world_data(tmp, seed, spec.sizes)
        data = tmp / "data"
        texts = (data / "pretrain.txt").read_text().splitlines()
        all_rows = {p.parent.name + "/" + p.stem: read_jsonl(p) for p in sorted(data.glob("*/*.jsonl"))}
        tokenizer = build_tokenizer(
            [*texts, *(r[k] for rows in all_rows.values() for r in rows for k in ("prompt", "completion"))]
        )
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        bar.update()

        t0 = time.perf_counter()
        torch.manual_seed(seed)
        base = _base_model(spec, len(tokenizer), tokenizer)
        pretrain = TrainConfig(**{**asdict(spec.pretrain), "seed": seed})
        curve = train_loop(
            base,
            base.parameters(),
            encode_text(tokenizer, texts),
            pretrain,
            pad_id=tokenizer.pad_token_id,
            desc="pretrain base",
        )
        base.save_pretrained(str(tmp / "base"))
        timings["pretrain_s"] = round(time.perf_counter() - t0, 1)
        losses["pretrain"] = round(sum(curve[-20:]) / len(curve[-20:]), 4)
        bar.update()

        for i, task in enumerate(lora_tasks):
            t0 = time.perf_counter()
            if task.startswith("oracle_"):
                rows, config = all_rows[f"{task.removeprefix('oracle_')}/oracle_train"], spec.oracle_lora
            else:
                rows, config = (
                    all_rows[f"{task}/train"],
                    spec.skill_lora if task in SKILLS else spec.pool_lora,
                )
            steps = spec.lora_steps.get(task, config.steps)
            config = TrainConfig(**{**asdict(config), "seed": seed * 1000 + i, "steps": steps})
            curve = train_lora(base, tokenizer, rows, config, spec, tmp / "loras" / task, desc=f"lora {task}")
            timings[f"lora_{task}_s"] = round(time.perf_counter() - t0, 1)
            losses[task] = round(sum(curve[-20:]) / len(curve[-20:]), 4)
            bar.update()

        manifest = {
            "format": FORMAT_VERSION,
            "profile": profile,
            "seed": seed,
            "versions": versions(),
            "settings": asdict(spec),
            "tasks": {"skills": SKILLS, "composites": COMPOSITES, "pool": POOL},
            "loras": lora_tasks,
            "build_seconds": round(time.perf_counter() - started, 1),
            "timings": timings,
            "final_train_loss": losses,
            "files": file_hashes(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        bar.update()
    bar.close()
    return out
