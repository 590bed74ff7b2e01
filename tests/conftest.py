"""Shared fixtures: tiny seeded models saved to temporary folders and PEFT adapters made by PEFT."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafuse.tiny import random_peft_adapter, save_model, tiny_gpt2, tiny_llama

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
torch.manual_seed(0)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tiny_llama(0), tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tiny_gpt2(0), tmp_path_factory.mktemp("gpt2") / "base")


def load(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.fixture()
def llama(llama_dir: Path) -> torch.nn.Module:
    return load(llama_dir)


@pytest.fixture()
def gpt2(gpt2_dir: Path) -> torch.nn.Module:
    return load(gpt2_dir)


@pytest.fixture(scope="session")
def llama_adapters(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three PEFT adapters of different ranks, alphas and targets, one with patterns and rsLoRA."""
    root = tmp_path_factory.mktemp("llama_adapters")
    model = load(llama_dir)
    return {
        "plain": random_peft_adapter(model, root / "plain", seed=1, r=4, lora_alpha=8),
        "patterned": random_peft_adapter(
            model,
            root / "patterned",
            seed=2,
            r=6,
            lora_alpha=12,
            rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 8},
            alpha_pattern={"v_proj": 3},
        ),
        "rslora_qv": random_peft_adapter(
            model,
            root / "rslora_qv",
            seed=3,
            r=8,
            lora_alpha=4,
            use_rslora=True,
            target_modules=["q_proj", "v_proj"],
        ),
    }


@pytest.fixture(scope="session")
def gpt2_adapters(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt2_adapters")
    model = load(gpt2_dir)
    return {
        "a": random_peft_adapter(model, root / "a", seed=4, r=4, lora_alpha=8, fan_in_fan_out=True),
        "b": random_peft_adapter(
            model,
            root / "b",
            seed=5,
            r=2,
            lora_alpha=16,
            fan_in_fan_out=True,
            target_modules=["c_attn"],
        ),
    }


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The skill world's ``tiny`` profile (hidden 32, 2 layers), built once per test session."""
    from lorafuse.skillworld import build_world

    return build_world(tmp_path_factory.mktemp("world") / "tiny", profile="tiny", seed=0, progress=False)


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0))  # (B, T)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``lorafuse ARGS`` through the real entry point (``main``): (exit status, stdout, stderr).

    Unlike ``CliRunner.invoke(app, ...)`` this goes through the error mapping users see: a
    lorafuse error is one ``error: ...`` line on stderr and status 2, never a traceback.
    """
    import sys

    from lorafuse.cli import main

    capsys.readouterr()
    saved = sys.argv
    sys.argv = ["lorafuse", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    return code, out, err
