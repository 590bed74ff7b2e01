"""Training rows of every kind: chat-template rendering and the loss mask, token by token."""

from __future__ import annotations

import json

import pytest
import torch

from lorafuse._data import DataFormatError, encode_messages, encode_rows
from lorafuse.tiny import chat_tokenizer, word_tokenizer

CONVERSATION = [
    {"role": "system", "content": "you are a helpful assistant ."},
    {"role": "user", "content": "ana has 3 apples and finds 4 more ."},
    {"role": "assistant", "content": "3 + 4 = 7 . she has 7 apples ."},
    {"role": "user", "content": "what is 12 times 3 ?"},
    {"role": "assistant", "content": "12 * 3 = 36 ."},
]


@pytest.fixture(scope="module")
def chat_tok():  # type: ignore[no-untyped-def]
    return chat_tokenizer()


def labelled_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:  # type: ignore[no-untyped-def]
    """The decoded text of each maximal run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_messages_rendered_with_the_template_and_loss_on_assistant_turns_only(chat_tok) -> None:  # type: ignore[no-untyped-def]
    ids, labels = encode_messages(chat_tok, CONVERSATION)
    rendered = chat_tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert chat_tok.decode(ids) == rendered  # the template's text, nothing added or lost
    assert ids == chat_tok(rendered, add_special_tokens=False)["input_ids"]
    # Each assistant turn's content and its end-of-turn marker, and nothing else.
    assert labelled_runs(chat_tok, ids, labels) == [
        "3 + 4 = 7 . she has 7 apples .<|im_end|>\n",
        "12 * 3 = 36 .<|im_end|>\n",
    ]


def test_role_headers_and_user_turns_carry_no_loss(chat_tok) -> None:  # type: ignore[no-untyped-def]
    ids, labels = encode_messages(chat_tok, CONVERSATION)
    unlabelled = chat_tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab == -100])
    assert "ana has 3 apples" in unlabelled and "<|im_start|>assistant\n" in unlabelled
    assert "36" not in unlabelled and "she has" not in unlabelled


def test_prompt_completion_with_chat_equals_a_two_turn_conversation(chat_tok) -> None:  # type: ignore[no-untyped-def]
    row = {"prompt": "what is 12 times 3 ?", "completion": "it is 36 ."}
    turns = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    assert encode_rows(chat_tok, [row], chat=True) == [encode_messages(chat_tok, turns)]


def test_plain_rows_without_chat_are_unchanged() -> None:
    tok = word_tokenizer()
    (ids, labels), (text_ids, text_labels) = encode_rows(
        tok, [{"prompt": "w5 w6", "completion": "w7"}, {"text": "w8 w9"}]
    )
    assert ids == [1, 5, 6, 7, 2] and labels == [-100, -100, -100, 7, 2]
    assert text_ids == [1, 8, 9, 2] and text_labels == [-100, 8, 9, 2]


def test_no_bos_tokenizer_gets_no_none_token(chat_tok) -> None:  # type: ignore[no-untyped-def]
    (ids, labels), *_ = encode_rows(chat_tok, [{"prompt": "hello", "completion": "fine ."}])
    assert None not in ids and labels[-1] == chat_tok.eos_token_id


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "starts with an assistant turn"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0]"),
        ({"prompt": "hi"}, '"prompt" and "completion" must both be strings'),
        ({"text": 5}, '"text" must be a string'),
        ({"input": "x"}, 'a row needs "messages"'),
        ("just a string", "expected an object"),
    ],
)
def test_bad_rows_name_the_row(chat_tok, row: object, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataFormatError, match="train.jsonl:2: ") as info:
        encode_rows(chat_tok, [{"text": "ok"}, row], source="train.jsonl")
    assert message in str(info.value)


def test_messages_need_a_chat_template() -> None:
    with pytest.raises(DataFormatError, match="no chat template"):
        encode_rows(word_tokenizer(), [{"messages": CONVERSATION}])


def test_read_rows_jsonl_parquet_and_saved_dataset(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import datasets

    from lorafuse._data import read_rows

    rows = [{"messages": CONVERSATION}, {"prompt": "p", "completion": "c"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_rows(tmp_path / "train.jsonl") == rows
    table = datasets.Dataset.from_list(
        [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    )
    table.to_parquet(str(tmp_path / "train.parquet"))
    assert read_rows(tmp_path / "train.parquet") == table.to_list()
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))
    assert read_rows(tmp_path / "saved") == table.to_list()
    with pytest.raises(DataFormatError, match="no split 'test'"):
        read_rows(tmp_path / "saved", split="test")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{oops\n', "bad.jsonl:2: not JSON"),
        ("list.jsonl", "[1, 2]\n", "list.jsonl:1: each line must be a JSON object"),
        ("empty.jsonl", "\n\n", "no examples"),
        ("latin.jsonl", b'{"prompt": "\xe9"}\n', "not UTF-8"),
        ("notes.txt", "hello\n", "not a data file lorafuse reads"),
    ],
)
def test_read_rows_bad_files(tmp_path, name: str, content: str | bytes, message: str) -> None:  # type: ignore[no-untyped-def]
    from lorafuse._data import read_rows

    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataFormatError, match=message):
        read_rows(path)


def test_cli_fuse_on_chat_rows_then_generate_with_the_template(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A {"messages"} JSONL trains LoRA-Flow gates from the CLI (gradient checkpointing on); the
    fusion records that it is a chat fusion and `generate` renders prompts with the template."""
    from conftest import run_cli
    from lorafuse.fusion import load_fusion
    from lorafuse.tiny import random_peft_adapter, save_model, tiny_llama

    tok = chat_tokenizer()
    model = tiny_llama(0, vocab_size=len(tok))
    base = save_model(model, tmp_path / "base")
    tok.save_pretrained(str(base))
    a = random_peft_adapter(model, tmp_path / "a", seed=1, r=2, lora_alpha=4)
    b = random_peft_adapter(model, tmp_path / "b", seed=2, r=2, lora_alpha=4)
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}] * 4
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, out, err = run_cli(
        ["fuse", "--base", base, "--lora", f"a={a}", "--lora", f"b={b}", "--train", tmp_path / "train.jsonl",
         "--epochs", "1", "--batch-size", "4", "--gradient-checkpointing", "--out", tmp_path / "fusion"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    fusion = load_fusion(tmp_path / "fusion")
    assert fusion.info["chat"] is True and fusion.info["examples"]["train"] == 8
    code, out, err = run_cli(
        ["generate", "--fusion", tmp_path / "fusion", "--prompt", "what is 12 times 3 ?",
         "--max-new-tokens", "4"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert out.strip() != ""


def test_cli_fuse_refuses_chat_rows_without_a_template(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from conftest import run_cli
    from lorafuse.tiny import random_peft_adapter, save_model, tiny_llama

    model = tiny_llama(0)
    base = save_model(model, tmp_path / "base")
    word_tokenizer().save_pretrained(str(base))
    a = random_peft_adapter(model, tmp_path / "a", seed=1, r=2, lora_alpha=4)
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    code, _, err = run_cli(
        ["fuse", "--base", base, "--lora", f"a={a}", "--train", tmp_path / "train.jsonl",
         "--out", tmp_path / "f"],
        capsys,
    )  # fmt: skip
    assert code == 2 and "train:1: the tokenizer has no chat template" in err
    assert err.count("error:") == 1 and "Traceback" not in err and not (tmp_path / "f").exists()


def test_cli_route_train_on_chat_rows(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from conftest import run_cli
    from lorafuse.tiny import save_model, tiny_llama

    tok = chat_tokenizer()
    base = save_model(tiny_llama(0, vocab_size=len(tok)), tmp_path / "base")
    tok.save_pretrained(str(base))
    rows = [{"messages": CONVERSATION}, {"prompt": "hello !", "completion": "hi ."}] * 4
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, _, err = run_cli(
        ["route", "train", "--base", base, "--data", tmp_path / "train.jsonl", "--chat", "--experts", "2",
         "--top-k", "1", "--steps", "2", "--batch-size", "4", "--out", tmp_path / "mix"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "mix" / "mixture.json").is_file()


@pytest.fixture()
def chat_base(tmp_path):  # type: ignore[no-untyped-def]
    """A tiny Llama saved with the ChatML tokenizer, two random PEFT LoRAs and a {"messages"} JSONL."""
    from lorafuse.tiny import random_peft_adapter, save_model, tiny_llama

    tok = chat_tokenizer()
    model = tiny_llama(0, vocab_size=len(tok))
    base = save_model(model, tmp_path / "base")
    tok.save_pretrained(str(base))
    loras = [
        random_peft_adapter(model, tmp_path / n, seed=s, r=2, lora_alpha=4) for n, s in [("a", 1), ("b", 2)]
    ]
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}] * 4
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"tok": tok, "base": base, "loras": loras, "rows": rows, "train": tmp_path / "train.jsonl"}


def _assistant_mask_only(tok, data) -> None:  # type: ignore[no-untyped-def]
    """Every example the loop trained on carries its loss on assistant turns only."""
    answers = {
        "3 + 4 = 7 . she has 7 apples .<|im_end|>\n",
        "12 * 3 = 36 .<|im_end|>\n",
    }
    assert data
    for ids, labels in data:
        runs = labelled_runs(tok, ids, labels)
        assert runs and set(runs) <= answers


def test_cli_route_train_encoder_on_chat_rows(chat_base, tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`route train-encoder` trains on {"messages"} rows with the loss on assistant turns only
    (what the training loop received), records that it is a chat encoder, and `route generate`
    then renders prompts with the chat template."""
    import lorafuse.fusion.instance as instance
    from conftest import run_cli

    seen: list = []
    loop = instance.train_loop

    def recording(model, params, data, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.extend(data)
        return loop(model, params, data, *args, **kwargs)

    monkeypatch.setattr(instance, "train_loop", recording)
    a, b = chat_base["loras"]
    code, out, err = run_cli(
        ["route", "train-encoder", "--base", chat_base["base"], "--lora", f"a={a}", "--lora", f"b={b}",
         "--data", chat_base["train"], "--steps", "3", "--batch-size", "4", "--out", tmp_path / "enc"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert len(seen) == len(chat_base["rows"])
    _assistant_mask_only(chat_base["tok"], seen)
    meta = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    assert meta["chat"] is True and meta["examples"] == 8
    rendered: list[bool] = []
    import lorafuse.eval as evaluation

    real = evaluation.generate

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        rendered.append(kwargs.get("chat", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "generate", spy)
    code, out, err = run_cli(
        ["route", "generate", "--mixture", tmp_path / "enc", "-p", "what is 12 times 3 ?",
         "--max-new-tokens", "3"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert rendered == [True] and out.startswith("what is 12 times 3 ? →")


def test_train_encoder_gradient_checkpointing_gives_the_same_losses(chat_base, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Recomputing the base's activations in the backward pass changes memory, not the training."""
    from safetensors.torch import load_file

    from conftest import run_cli

    a, b = chat_base["loras"]
    weights = []
    for name, extra in [("plain", []), ("ckpt", ["--gradient-checkpointing"])]:
        code, _, err = run_cli(
            ["route", "train-encoder", "--base", chat_base["base"], "--lora", f"a={a}", "--lora", f"b={b}",
             "--data", chat_base["train"], "--steps", "4", "--batch-size", "4", "--lr", "0.1",
             "--out", tmp_path / name, *extra],
            capsys,
        )  # fmt: skip
        assert code == 0, err
        weights.append(load_file(str(tmp_path / name / "encoder.safetensors")))
    for key in ("query", "keys"):
        assert torch.allclose(weights[0][key], weights[1][key], atol=1e-5)
    first = load_file(str(tmp_path / "plain" / "encoder.safetensors"))
    from lorafuse.fusion.instance import EncoderConfig, InstanceEncoder

    initial = InstanceEncoder(first["query"].shape[1], 2, EncoderConfig()).state_dict()
    assert not torch.allclose(initial["keys"], first["keys"])  # it did train


def test_cli_train_lora_on_chat_rows_is_a_peft_adapter_that_lowers_the_loss(
    chat_base, tmp_path, capsys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The fresh-LoRA control from the CLI: trained on {"messages"} rows with the loss on assistant
    turns only, written as a PEFT folder that PEFT and lorafuse load, with a lower loss on its
    training conversations than the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import lorafuse.fusion.api as api
    from conftest import run_cli
    from lorafuse.adapters import load_lora
    from lorafuse.train.loop import dev_loss

    seen: list = []
    loop = api.train

    def recording(model, params, data, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.extend(data)
        return loop(model, params, data, *args, **kwargs)

    monkeypatch.setattr(api, "train", recording)
    code, out, err = run_cli(
        ["train-lora", "--base", chat_base["base"], "--train", chat_base["train"], "--rank", "4",
         "--epochs", "4", "--lr", "0.01", "--batch-size", "4", "--out", tmp_path / "fresh"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "wrote" in out and len(seen) == len(chat_base["rows"])
    _assistant_mask_only(chat_base["tok"], seen)
    record = json.loads((tmp_path / "fresh" / "lorafuse.json").read_text())
    assert record["chat"] is True and record["seed"] == 0 and record["result"]["steps"] == 8
    lora = load_lora(tmp_path / "fresh")
    assert len(lora.modules) == 2 * 7  # all-linear on a 2-layer Llama: q k v o gate up down
    assert all(bool(m.B.abs().sum() > 0) for m in lora.modules.values())  # PEFT starts B at 0
    base = AutoModelForCausalLM.from_pretrained(str(chat_base["base"])).eval()
    data = encode_rows(chat_base["tok"], chat_base["rows"])
    before = dev_loss(base, data, pad_id=0)
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "fresh")).eval()
    assert dev_loss(tuned, data, pad_id=0) < before - 0.05


def test_cli_train_lora_refuses_unknown_target_modules_in_one_line(chat_base, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from conftest import run_cli

    code, _, err = run_cli(
        ["train-lora", "--base", chat_base["base"], "--train", chat_base["train"], "--target-modules",
         "wq,wv", "--out", tmp_path / "fresh"],
        capsys,
    )  # fmt: skip
    assert code == 2 and "target modules ['wq', 'wv'] cannot be adapted" in err and "q_proj" in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "fresh").exists()


def test_cli_train_lora_gradient_checkpointing_trains_the_same_lora(chat_base, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    from conftest import run_cli

    weights = []
    for name, extra in [("plain", []), ("ckpt", ["--gradient-checkpointing"])]:
        code, _, err = run_cli(
            ["train-lora", "--base", chat_base["base"], "--train", chat_base["train"], "--rank", "2",
             "--target-modules", "q_proj,v_proj", "--epochs", "1", "--lr", "0.01", "--out", tmp_path / name,
             *extra],
            capsys,
        )  # fmt: skip
        assert code == 0, err
        weights.append(load_file(str(tmp_path / name / "adapter_model.safetensors")))
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) == 2 * 2 * 2  # 2 layers × q, v × A, B
    for key, value in weights[0].items():
        assert torch.allclose(value, weights[1][key], atol=1e-6), key
    assert any(bool(v.abs().sum() > 0) for k, v in weights[0].items() if "lora_B" in k)
