"""What lm-eval-harness and OpenAI clients send: logprobs, echo, n > 1, token-id prompts and the
tokenizer routes, checked against a single forward pass of the base with the adapter attached."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafuse import attach, detach, load_lora
from lorafuse.serve import Limits, Server, ServeSettings
from lorafuse.serve.logprobs import completion_logprobs, records, token_logprobs

KEY = "test-key"
BASE = "world"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def _model(world: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(world / "base", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def server(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("served_lp") / "adapters"
    folder.mkdir()
    names = sorted(p.name for p in (tiny_world / "loras").iterdir() if (p / "adapter_config.json").is_file())[
        :2
    ]
    for name in names:
        shutil.copytree(tiny_world / "loras" / name, folder / name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_world / "tokenizer")
    prompts = [json.loads(line)["prompt"] for line in (tiny_world / "data" / "math" / "test.jsonl").open()][
        :3
    ]
    settings = ServeSettings(
        base_name=BASE, api_key=KEY, max_batch=8, max_loaded=4, limits=Limits(max_tokens=64), threads=1
    )
    srv = Server(_model(tiny_world), tokenizer, folder, settings)
    with srv.background() as url:
        yield {
            "url": url,
            "world": tiny_world,
            "folder": folder,
            "names": names,
            "tokenizer": tokenizer,
            "prompts": prompts,
        }


def _post(server: dict[str, Any], route: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server["url"] + route, json=body, headers=HEADERS, timeout=60)


def _ok(server: dict[str, Any], route: str, body: dict[str, Any]) -> dict[str, Any]:
    response = _post(server, route, body)
    assert response.status_code == 200, response.text
    return response.json()


def _ids(server: dict[str, Any], prompt: str) -> list[int]:
    return _ok(server, "/tokenize", {"model": BASE, "prompt": prompt})["tokens"]


@torch.no_grad()
def _reference(server: dict[str, Any], model_name: str, ids: list[int]) -> torch.Tensor:
    """Log-softmax (L, V) of one forward pass over ``ids`` with ``model_name``'s adapter attached."""
    model = _model(server["world"])
    if model_name != BASE:
        attach(model, {model_name: load_lora(server["folder"] / model_name)})
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    if model_name != BASE:
        detach(model)
    return torch.log_softmax(logits.float(), -1)


def test_token_logprobs_is_log_softmax_and_top_k() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=g) * 3
    chosen = torch.tensor([0, 7, 39, 3, 3])
    picked, values, ids = token_logprobs(logits, chosen, 4)
    reference = logits.double().softmax(-1).log()
    assert torch.allclose(picked.double(), reference[torch.arange(5), chosen], atol=1e-5)
    assert torch.allclose(values.double(), reference.sort(-1, descending=True).values[:, :4], atol=1e-5)
    assert torch.equal(ids, reference.argsort(-1, descending=True)[:, :4])
    assert (values[:, :-1] >= values[:, 1:]).all()
    assert token_logprobs(logits, chosen, 0)[1].shape == (5, 0)
    out = completion_logprobs(records(logits[:2], chosen[:2], 1), lambda t, i: f"<{t}>", 1, start=3)
    assert out["tokens"] == ["<0>", "<7>"] and out["text_offset"] == [3, 6]
    assert all(len(top) in (1, 2) for top in out["top_logprobs"])  # the best one, and the chosen one


def test_echo_gives_the_prompt_logprobs_of_one_forward_pass(server: dict[str, Any]) -> None:
    name, prompt = server["names"][0], server["prompts"][0]
    body = {"model": name, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 5, "temperature": 0}
    out = _ok(server, "/v1/completions", body)
    (choice,) = out["choices"]
    lp = choice["logprobs"]
    ids = _ids(server, prompt)
    assert choice["text"] == prompt and out["usage"]["completion_tokens"] == 0
    assert len(lp["token_logprobs"]) == len(ids) == len(lp["tokens"]) == len(lp["text_offset"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    reference = _reference(server, name, ids)
    expected = reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), expected, atol=1e-4)
    for position, top in enumerate(lp["top_logprobs"][1:]):
        values = list(top.values())
        best = reference[position].topk(5).values
        assert torch.allclose(torch.tensor(values[:5]), best, atol=1e-4)  # sorted, best first
        assert values[:5] == sorted(values[:5], reverse=True)
    # the base gives other numbers: the adapter is really applied
    base = _ok(server, "/v1/completions", {**body, "model": BASE})["choices"][0]["logprobs"]["token_logprobs"]
    assert max(abs(a - b) for a, b in zip(base[1:], lp["token_logprobs"][1:], strict=True)) > 1e-3


def test_greedy_generated_logprobs_match_the_reference(server: dict[str, Any]) -> None:
    name, prompt = server["names"][1], server["prompts"][1]
    body = {"model": name, "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 3}
    (choice,) = _ok(server, "/v1/completions", body)["choices"]
    lp = choice["logprobs"]
    ids = _ids(server, prompt)
    generated: list[int] = []
    expected = []
    for _ in range(len(lp["token_logprobs"])):
        reference = _reference(server, name, ids + generated)[-1]
        token = int(reference.argmax())
        expected.append(float(reference[token]))
        generated.append(token)
    assert len(lp["token_logprobs"]) >= 1
    assert torch.allclose(torch.tensor(lp["token_logprobs"]), torch.tensor(expected), atol=1e-4)
    assert "".join(lp["tokens"]) == choice["text"]
    for value, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert len(top) == 3 and max(top.values()) == value  # greedy: the chosen token is the best
        assert list(top.values()) == sorted(top.values(), reverse=True)


def test_lm_eval_loglikelihood_request(server: dict[str, Any]) -> None:
    """lm-eval's ``local-completions``: token ids, ``echo``, ``max_tokens: 1``, ``logprobs: 1``."""
    prompts = server["prompts"][:2]
    batch = [_ids(server, p) for p in prompts]
    body = {"model": BASE, "prompt": batch, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    choices = _ok(server, "/v1/completions", body)["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for ids, choice in zip(batch, choices, strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then one generated token
        reference = _reference(server, BASE, ids)
        expected = reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert torch.allclose(torch.tensor(lp["token_logprobs"][1 : len(ids)]), expected, atol=1e-4)
        assert abs(lp["token_logprobs"][-1] - float(reference[-1].max())) < 1e-4


def test_lm_eval_generate_until_request(server: dict[str, Any]) -> None:
    """lm-eval's ``local-completions`` generate_until body (captured from lm-eval 0.4.13): a list
    of lists of ids encoded without ``<s>``, ``stop`` = the task's ``until`` plus the tokenizer's
    eos text, ``seed: 1234``, ``temperature: 0.0``. The eos text never stops a generation (the
    end-of-sequence token itself does, and is not in the text), so the answer is the plain one."""
    name, prompts = server["names"][0], server["prompts"][:2]
    bare = {"model": BASE, "add_special_tokens": False}
    batch = [_ok(server, "/tokenize", {**bare, "prompt": p})["tokens"] for p in prompts]
    body = {"model": name, "prompt": batch, "max_tokens": 12, "temperature": 0.0}
    plain = _ok(server, "/v1/completions", body)["choices"]
    sent = _ok(server, "/v1/completions", {**body, "stop": ["</s>"], "seed": 1234})["choices"]
    assert [c["text"] for c in sent] == [c["text"] for c in plain]
    assert all("</s>" not in c["text"] for c in sent)
    # HumanEval's `until` (5 strings) plus the eos text: more than OpenAI's 4, accepted
    humaneval = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "</s>"]
    assert (
        _ok(server, "/v1/completions", {**body, "stop": humaneval})["choices"][0]["text"] == plain[0]["text"]
    )
    # "<s>" written in a prompt is the one <s> id (examples/lm_eval's `bos` variant relies on it)
    tokenizer = server["tokenizer"]
    if tokenizer.bos_token_id is not None:
        marked = _ok(server, "/tokenize", {**bare, "prompt": f"{tokenizer.bos_token} {prompts[0]}"})["tokens"]
        assert marked == [tokenizer.bos_token_id, *batch[0]] == _ids(server, prompts[0])


def test_token_id_prompts_give_the_string_prompts_text(server: dict[str, Any]) -> None:
    name, prompts = server["names"][0], server["prompts"]
    common = {"model": name, "max_tokens": 8, "min_tokens": 8, "temperature": 0}
    alone = [_ok(server, "/v1/completions", {**common, "prompt": p})["choices"][0]["text"] for p in prompts]
    as_ids = _ok(server, "/v1/completions", {**common, "prompt": _ids(server, prompts[0])})["choices"]
    assert as_ids[0]["text"] == alone[0]
    for batch in ([_ids(server, p) for p in prompts], list(prompts)):
        choices = _ok(server, "/v1/completions", {**common, "prompt": batch})["choices"]
        assert [c["index"] for c in choices] == list(range(len(prompts)))
        assert [c["text"] for c in choices] == alone
    echoed = _ok(server, "/v1/completions", {**common, "prompt": _ids(server, prompts[0]), "echo": True})
    assert echoed["choices"][0]["text"].startswith(prompts[0]) and alone[0]
    assert echoed["choices"][0]["text"].endswith(alone[0])


def test_rows_of_one_batch_get_their_own_adapters_logprobs(server: dict[str, Any]) -> None:
    models = [*server["names"], BASE]
    prompt = server["prompts"][2]
    ids = _ids(server, prompt)
    results: dict[str, list[float]] = {}

    def run(model: str) -> None:
        body = {"model": model, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
        results[model] = _ok(server, "/v1/completions", body)["choices"][0]["logprobs"]["token_logprobs"]

    threads = [threading.Thread(target=run, args=(m,)) for m in models for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for model in models:
        reference = _reference(server, model, ids)
        expected = reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert torch.allclose(torch.tensor(results[model][1:]), expected, atol=1e-4), model


def test_n_samples(server: dict[str, Any]) -> None:
    name, prompts = server["names"][0], server["prompts"]
    body = {"model": name, "prompt": prompts[0], "max_tokens": 10, "temperature": 1.0, "n": 4, "seed": 3}
    first = _ok(server, "/v1/completions", body)["choices"]
    again = _ok(server, "/v1/completions", body)["choices"]
    assert [c["index"] for c in first] == [0, 1, 2, 3]
    assert [c["text"] for c in first] == [c["text"] for c in again]  # seeded
    assert len({c["text"] for c in first}) > 1  # independent samples
    greedy = _ok(server, "/v1/completions", {**body, "temperature": 0, "n": 3})["choices"]
    assert len(greedy) == 3 and len({c["text"] for c in greedy}) == 1  # OpenAI: n identical choices
    both = _ok(server, "/v1/completions", {**body, "prompt": prompts[:2], "n": 2, "temperature": 0})[
        "choices"
    ]
    alone = [
        _ok(server, "/v1/completions", {**body, "prompt": p, "n": 1, "temperature": 0})["choices"][0]["text"]
        for p in prompts[:2]
    ]
    assert [c["text"] for c in both] == [alone[0], alone[0], alone[1], alone[1]]  # prompt-major order
    chat = {"model": name, "messages": [{"role": "user", "content": prompts[0]}], "max_tokens": 5, "n": 2}
    assert len(_ok(server, "/v1/chat/completions", {**chat, "seed": 1})["choices"]) == 2


def test_chat_logprobs(server: dict[str, Any]) -> None:
    name, prompt = server["names"][0], server["prompts"][0]
    body = {
        "model": name,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 5,
        "min_tokens": 5,  # no end-of-sequence first: logprobs are those the sampler sees, after the ban
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    out = _ok(server, "/v1/chat/completions", body)
    (choice,) = out["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"] >= 1
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    for entry in content:
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(tops) == 2 and tops == sorted(tops, reverse=True) and tops[0] == entry["logprob"]
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert bytes(entry["bytes"]).decode() == entry["token"]
    plain = _ok(server, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})
    assert plain["choices"][0]["logprobs"] is None


def test_tokenize_detokenize_and_tokenizer_info(server: dict[str, Any]) -> None:
    prompt = server["prompts"][0]
    out = _ok(server, "/tokenize", {"model": BASE, "prompt": prompt})
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] > 0
    assert _ok(server, "/detokenize", {"model": BASE, "tokens": out["tokens"]})["prompt"] == prompt
    bare = _ok(server, "/tokenize", {"model": BASE, "prompt": prompt, "add_special_tokens": False})["tokens"]
    tokenizer = server["tokenizer"]
    if tokenizer.bos_token_id is not None:
        assert out["tokens"] == [tokenizer.bos_token_id, *bare]
    info = httpx.get(server["url"] + "/tokenizer_info", headers=HEADERS).json()
    assert info["eos_token_id"] == tokenizer.eos_token_id and info["vocab_size"] >= max(out["tokens"]) + 1
    assert {"tokenizer_class", "bos_token", "eos_token", "pad_token", "model_max_length"} <= set(info)
    assert httpx.get(server["url"] + "/tokenizer_info").status_code == 401  # the key is needed


@pytest.mark.parametrize(
    ("route", "body", "param", "words"),
    [
        ("/v1/completions", {"logprobs": 21}, "logprobs", "less than or equal to 20"),
        ("/v1/completions", {"logprobs": -1}, "logprobs", "greater than or equal to 0"),
        ("/v1/completions", {"logprobs": "3"}, "logprobs", "integer"),
        ("/v1/completions", {"logprobs": True}, "logprobs", "integer"),
        ("/v1/completions", {"logprobs": 2.5}, "logprobs", "integer"),
        ("/v1/completions", {"echo": "yes"}, "echo", "boolean"),
        ("/v1/completions", {"n": 0}, "n", "greater than or equal to 1"),
        ("/v1/completions", {"n": 40}, "n", "at most 32"),
        ("/v1/completions", {"prompt": []}, "prompt", "empty list"),
        ("/v1/completions", {"prompt": [[]]}, "prompt", "prompt 0 is an empty list"),
        ("/v1/completions", {"prompt": [1, "a"]}, "prompt", "mixes kinds"),
        ("/v1/completions", {"prompt": [1, True]}, "prompt", "item 1 is not a token id"),
        ("/v1/completions", {"prompt": [1, -4]}, "prompt", "negative token id"),
        ("/v1/completions", {"prompt": [1, 10**6]}, "prompt", "outside the vocabulary"),
        ("/v1/completions", {"prompt": [[1], [1, 10**6]]}, "prompt.1", "outside the vocabulary"),
        ("/v1/completions", {"prompt": {"a": 1}}, "prompt", "must be a string"),
        ("/v1/completions", {"max_tokens": 0}, None, "max_tokens: 0 needs `echo`"),
        ("/v1/completions", {"stream": True, "logprobs": 1}, None, "logprobs"),
        ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs", "boolean"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
        ("/v1/chat/completions", {"top_logprobs": 2}, None, "top_logprobs needs `logprobs: true`"),
        ("/v1/chat/completions", {"max_tokens": 0}, None, "max_tokens"),
        ("/detokenize", {"tokens": [10**6]}, "tokens", "outside the vocabulary"),
        ("/detokenize", {"tokens": ["a"]}, "tokens.0", "integer"),
        ("/tokenize", {"prompt": 5}, "prompt", "string"),
        ("/v1/completions", {"stop": ["x"] * 17}, "stop", "at most 16 non-empty strings"),
        ("/v1/completions", {"stop": ["x", ""]}, "stop", "at most 16 non-empty strings"),
    ],
)
def test_bad_values_are_400_naming_the_field(
    server: dict[str, Any], route: str, body: dict[str, Any], param: str | None, words: str
) -> None:
    base: dict[str, Any] = {"model": server["names"][0]}
    if route == "/v1/completions":
        base["prompt"] = "a"
    elif route == "/v1/chat/completions":
        base["messages"] = [{"role": "user", "content": "a"}]
    response = _post(server, route, {**base, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"], error
    assert error["param"] == param, error
    field = (param or words.split(":")[0].split(" ")[0]).strip("`")
    assert field.split(".")[0] in error["message"]


def test_prompt_logprob_prefills_are_bounded() -> None:
    from lorafuse.serve.engine import PROMPT_LOGPROB_TOKENS, Request, SamplingParams, prefill_groups

    def request(length: int, echo: bool) -> Request:
        params = SamplingParams(prompt_logprobs=0 if echo else None)
        return Request([1] * length, None, params, lambda ev: None)  # type: ignore[arg-type]

    plain = [request(10, False) for _ in range(5)]
    echoed = [request(n, True) for n in (3000, 100, 5000, 9000, 200)]
    groups = prefill_groups(plain + echoed)
    assert groups[0] == plain  # one prefill for every row that needs only its last logits
    assert sorted(id(r) for g in groups[1:] for r in g) == sorted(id(r) for r in echoed)
    for group in groups[1:]:
        width = max(len(r.prompt_ids) for r in group)
        assert len(group) == 1 or width * len(group) <= PROMPT_LOGPROB_TOKENS
