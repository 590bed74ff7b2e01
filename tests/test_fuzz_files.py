"""Hostile files: every malformed file a loader reads is one clear ``LorafuseError`` naming it.

One table of cases. Each case copies a valid artifact (a PEFT adapter, three kinds of saved
fusion, a mixture, an instance encoder, four kinds of compressed delta, a model checkpoint, a
merge recipe, a training checkpoint), breaks one thing in it, and asserts that its loader raises a
``LorafuseError`` whose message holds the file and the field (or tensor) at fault. Any other
exception (``KeyError``, ``TypeError``, ``AttributeError``, ``RecursionError``...) is a defect,
and so is a load that succeeds with a NaN, an infinite or a silently reinterpreted value.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load
from lorafuse import LorafuseError, load_lora
from lorafuse.compress import compress_checkpoint, load_compressed
from lorafuse.compress.checkpoint import open_checkpoint
from lorafuse.fusion.artefact import Fusion, adapter_hashes, load_fusion, save_fusion
from lorafuse.fusion.gate import GateConfig
from lorafuse.fusion.instance import EncoderConfig, InstanceEncoder, InstanceMixing, read_encoder
from lorafuse.merging import load_recipe
from lorafuse.route.mixture import Mixture, MixtureConfig
from lorafuse.runtime import detach
from lorafuse.tiny import save_model, tiny_llama
from lorafuse.train.loop import TrainResult, _Checkpoint

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
MODULE = "model.layers.0.mlp.down_proj"  # the first module of every compressed delta
FINGERPRINT = {"run": "fuzz"}
RECIPE = "merge_method: linear\nmodels:\n  - adapter: a\n    weight: 1.0\n  - adapter: b\n    weight: 0.5\n"

Mutation = Callable[[Path], None]


# ---- mutations ---------------------------------------------------------------------------------


def edit(name: str, fn: Callable[[Any], Any]) -> Mutation:
    """Rewrite the JSON file ``name``: ``fn`` changes the object in place or returns a new one.

    ``json.dumps`` writes NaN / Infinity literals, exactly what a careless writer produces.
    """

    def mutate(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        changed = fn(data)
        (folder / name).write_text(json.dumps(data if changed is None else changed))

    return mutate


def put(name: str, dotted: str, value: object) -> Mutation:
    """Set ``a.b.0.c`` in the JSON file ``name`` (list indices as numbers)."""

    def fn(data: Any) -> None:
        *parents, last = dotted.split(".")
        for part in parents:
            data = data[int(part)] if isinstance(data, list) else data[part]
        data[int(last) if isinstance(data, list) else last] = value

    return edit(name, fn)


def drop(name: str, dotted: str) -> Mutation:
    """Delete ``a.b`` from the JSON file ``name``."""

    def fn(data: Any) -> None:
        *parents, last = dotted.split(".")
        for part in parents:
            data = data[int(part)] if isinstance(data, list) else data[part]
        del data[last]

    return edit(name, fn)


def raw(name: str, content: str | bytes) -> Mutation:
    def mutate(folder: Path) -> None:
        path = folder / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return mutate


def remove(name: str) -> Mutation:
    return lambda folder: (folder / name).unlink()


def tensors(name: str, fn: Callable[[dict[str, torch.Tensor]], None]) -> Mutation:
    def mutate(folder: Path) -> None:
        state = load_file(folder / name)
        fn(state)
        save_file(state, str(folder / name))

    return mutate


def poke(key: str, value: float, index: tuple[int, ...] | None = None) -> Callable[[dict], None]:
    """Set one element of tensor ``key`` (the first one by default) to ``value``."""

    def fn(state: dict[str, torch.Tensor]) -> None:
        flat = state[key].reshape(-1) if index is None else state[key]
        flat[index if index is not None else 0] = value

    return fn


def reshape(key: str, shape: tuple[int, ...]) -> Callable[[dict], None]:
    return lambda state: state.__setitem__(key, torch.zeros(shape))


def header(name: str, obj: object, data: bytes = b"") -> Mutation:
    """Replace the safetensors file ``name`` by one with this header (any JSON) and data."""
    text = json.dumps(obj).encode()
    return raw(name, struct.pack("<Q", len(text)) + text + data)


def entry(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def record(dotted: str, value: object) -> Mutation:
    """Set ``dotted`` inside the record of ``MODULE`` in ``compressed.json``."""

    def fn(data: dict) -> None:
        target = data["modules"][MODULE]
        *parents, last = dotted.split(".")
        for part in parents:
            target = target[part]
        target[last] = value

    return edit("compressed.json", fn)


def fused(meta: Callable[[dict], None]) -> Mutation:
    return edit("fusion.json", meta)


# ---- the table: (id, artifact, mutation, substrings the message must hold) -------------------------

CFG, WTS = "adapter_config.json", "adapter_model.safetensors"
FJ, FW = "fusion.json", "weights.safetensors"
MJ, MW = "mixture.json", "router.safetensors"
EJ, EW = "encoder.json", "encoder.safetensors"
CJ, CW = "compressed.json", "delta.safetensors"
nan, inf = float("nan"), float("inf")

CASES: list[tuple[str, str, Mutation, tuple[str, ...]]] = [
    # adapter_config.json: numbers
    ("alpha-nan", "adapter", put(CFG, "lora_alpha", nan), (CFG, "lora_alpha", "NaN")),
    ("alpha-inf", "adapter", put(CFG, "lora_alpha", inf), (CFG, "lora_alpha", "Infinity")),
    ("alpha-neg-inf", "adapter", put(CFG, "lora_alpha", -inf), (CFG, "lora_alpha", "-Infinity")),
    ("alpha-1e308", "adapter", put(CFG, "lora_alpha", 1e308), (CFG, "lora_alpha", "1e+308")),
    (
        "alpha-1e400",
        "adapter",
        raw(CFG, '{"peft_type": "LORA", "r": 4, "lora_alpha": 1e400}'),
        (CFG, "lora_alpha", "overflows"),
    ),
    ("alpha-zero", "adapter", put(CFG, "lora_alpha", 0), (CFG, "lora_alpha", "greater than 0")),
    ("alpha-bool", "adapter", put(CFG, "lora_alpha", True), (CFG, "lora_alpha", "True")),
    ("alpha-tiny-scale-zero", "adapter", put(CFG, "lora_alpha", 5e-324), (CFG, "lora_alpha", "scale")),
    (
        "alpha-pattern-nan",
        "adapter",
        put(CFG, "alpha_pattern", {"q_proj": nan}),
        (CFG, "alpha_pattern.q_proj"),
    ),
    (
        "alpha-pattern-inf",
        "adapter",
        put(CFG, "alpha_pattern", {"q_proj": inf}),
        (CFG, "alpha_pattern.q_proj"),
    ),
    (
        "alpha-pattern-zero",
        "adapter",
        put(CFG, "alpha_pattern", {"q_proj": 0}),
        (CFG, "alpha_pattern.q_proj", "0"),
    ),
    (
        "alpha-pattern-negative",
        "adapter",
        put(CFG, "alpha_pattern", {"q_proj": -3}),
        (CFG, "alpha_pattern.q_proj", "-3"),
    ),
    (
        "alpha-pattern-text",
        "adapter",
        put(CFG, "alpha_pattern", {"q_proj": "x"}),
        (CFG, "alpha_pattern.q_proj", "'x'"),
    ),
    (
        "alpha-pattern-bad-regex",
        "adapter",
        put(CFG, "alpha_pattern", {"[": 2}),
        (CFG, "alpha_pattern", "'['", "regular expression"),
    ),
    ("r-nan", "adapter", put(CFG, "r", nan), (CFG, "r", "NaN")),
    ("r-fraction", "adapter", put(CFG, "r", 4.5), (CFG, "r:", "4.5")),
    ("r-zero", "adapter", put(CFG, "r", 0), (CFG, "r:", "0")),
    ("r-negative", "adapter", put(CFG, "r", -4), (CFG, "r:", "-4")),
    ("r-bool", "adapter", put(CFG, "r", True), (CFG, "r:", "True")),
    (
        "rank-pattern-bad-regex",
        "adapter",
        put(CFG, "rank_pattern", {"(": 4}),
        (CFG, "rank_pattern", "'('", "regular expression"),
    ),
    (
        "rank-pattern-text",
        "adapter",
        put(CFG, "rank_pattern", {"q_proj": "x"}),
        (CFG, "rank_pattern.q_proj", "'x'"),
    ),
    (
        "rank-pattern-fraction",
        "adapter",
        put(CFG, "rank_pattern", {"q_proj": 2.5}),
        (CFG, "rank_pattern.q_proj", "2.5"),
    ),
    (
        "rank-pattern-backtracking",
        "adapter",
        put(CFG, "rank_pattern", {"(.*.*)*z": 2}),
        (CFG, "rank_pattern", "repeated groups"),
    ),
    ("rslora-string-false", "adapter", put(CFG, "use_rslora", "false"), (CFG, "use_rslora", "'false'")),
    ("rslora-number", "adapter", put(CFG, "use_rslora", 1), (CFG, "use_rslora", "1")),
    ("dora-string", "adapter", put(CFG, "use_dora", "no"), (CFG, "use_dora", "'no'")),
    (
        "base-model-number",
        "adapter",
        put(CFG, "base_model_name_or_path", 7),
        (CFG, "base_model_name_or_path"),
    ),
    # adapter_config.json: text and structure
    (
        "config-latin1",
        "adapter",
        raw(CFG, '{"peft_type": "LORA", "x": "é"}'.encode("latin-1")),
        (CFG, "UTF-8"),
    ),
    ("config-utf16", "adapter", raw(CFG, '{"peft_type": "LORA"}'.encode("utf-16")), (CFG, "UTF-8")),
    ("config-deep", "adapter", raw(CFG, "[" * 100_000), (CFG, "nested too deeply")),
    ("config-huge-int", "adapter", raw(CFG, '{"r": ' + "9" * 5000 + "}"), (CFG, "invalid JSON")),
    # adapter_model.safetensors headers
    ("header-list", "adapter", header(WTS, [1, 2]), (WTS, "header is a JSON list")),
    ("header-number", "adapter", header(WTS, 5), (WTS, "header is a JSON int")),
    ("header-string", "adapter", header(WTS, "x"), (WTS, "header is a JSON str")),
    (
        "header-deep",
        "adapter",
        raw(WTS, struct.pack("<Q", 100_000) + b"[" * 100_000),
        (WTS, "nested too deeply"),
    ),
    (
        "header-metadata-list",
        "adapter",
        header(WTS, {"__metadata__": [1], Q_A: entry()}, bytes(16)),
        (WTS, "__metadata__"),
    ),
    ("entry-not-object", "adapter", header(WTS, {Q_A: [1, 2]}), (WTS, Q_A, "not an object")),
    ("entry-no-dtype", "adapter", header(WTS, {Q_A: entry(dtype=None)}, bytes(16)), (WTS, Q_A, "no 'dtype'")),
    (
        "entry-no-offsets",
        "adapter",
        header(WTS, {Q_A: entry(data_offsets=None)}, bytes(16)),
        (WTS, Q_A, "no 'data_offsets'"),
    ),
    ("entry-no-shape", "adapter", header(WTS, {Q_A: entry(shape=None)}, bytes(16)), (WTS, Q_A, "no 'shape'")),
    (
        "entry-unknown-dtype",
        "adapter",
        header(WTS, {Q_A: entry(dtype="F99")}, bytes(16)),
        (WTS, Q_A, "'F99'"),
    ),
    (
        "offsets-one",
        "adapter",
        header(WTS, {Q_A: entry(data_offsets=[16])}, bytes(16)),
        (WTS, Q_A, "data_offsets"),
    ),
    (
        "offsets-negative",
        "adapter",
        header(WTS, {Q_A: entry(data_offsets=[-16, 0])}, bytes(16)),
        (WTS, Q_A, "data_offsets"),
    ),
    (
        "offsets-reversed",
        "adapter",
        header(WTS, {Q_A: entry(data_offsets=[16, 0])}, bytes(16)),
        (WTS, Q_A, "end before"),
    ),
    (
        "offsets-text",
        "adapter",
        header(WTS, {Q_A: entry(data_offsets=["0", "16"])}, bytes(16)),
        (WTS, Q_A, "data_offsets"),
    ),
    (
        "offsets-fraction",
        "adapter",
        header(WTS, {Q_A: entry(data_offsets=[0, 16.0])}, bytes(16)),
        (WTS, Q_A, "data_offsets"),
    ),
    ("shape-negative", "adapter", header(WTS, {Q_A: entry(shape=[-2, -2])}, bytes(16)), (WTS, Q_A, "shape")),
    ("shape-not-list", "adapter", header(WTS, {Q_A: entry(shape=4)}, bytes(16)), (WTS, Q_A, "shape")),
    (
        "shape-size-mismatch",
        "adapter",
        header(WTS, {Q_A: entry(shape=[4, 4])}, bytes(16)),
        (WTS, Q_A, "inconsistent"),
    ),
    # fusion.json
    ("fusion-list", "fusion-static", raw(FJ, "[]"), (FJ, "JSON object")),
    ("fusion-nan-literal", "fusion-flow", put(FJ, "gate.temperature", nan), (FJ, "gate.temperature", "NaN")),
    ("fusion-deep", "fusion-static", raw(FJ, "[" * 100_000), (FJ, "nested too deeply")),
    ("fusion-no-loras", "fusion-static", drop(FJ, "loras"), (FJ, "loras", "required")),
    ("fusion-no-method", "fusion-static", drop(FJ, "method"), (FJ, "method", "required")),
    ("fusion-empty-loras", "fusion-static", put(FJ, "loras", []), (FJ, "loras")),
    ("fusion-lora-not-object", "fusion-static", put(FJ, "loras", ["a", "b"]), (FJ, "loras.0")),
    ("fusion-lora-name-number", "fusion-static", put(FJ, "loras.0.name", 5), (FJ, "loras.0.name")),
    ("fusion-lora-no-name", "fusion-static", drop(FJ, "loras.0.name"), (FJ, "loras.0.name", "required")),
    ("fusion-lora-path-number", "fusion-static", put(FJ, "loras.0.path", 5), (FJ, "loras.0.path")),
    ("fusion-duplicate-names", "fusion-static", put(FJ, "loras.1.name", "plain"), (FJ, "more than once")),
    ("fusion-sha-empty", "fusion-static", put(FJ, "loras.0.sha256", {}), (FJ, "loras.0.sha256")),
    ("fusion-sha-missing", "fusion-static", drop(FJ, "loras.0.sha256"), (FJ, "loras.0.sha256", "required")),
    (
        "fusion-sha-short",
        "fusion-static",
        fused(lambda m: m["loras"][0]["sha256"].update({CFG: "abc"})),
        (FJ, "loras.0.sha256"),
    ),
    ("fusion-sha-string", "fusion-static", put(FJ, "loras.0.sha256", "deadbeef"), (FJ, "loras.0.sha256")),
    (
        "fusion-sha-unknown-file",
        "fusion-static",
        put(FJ, "loras.0.sha256", {"x.bin": "0" * 64}),
        (FJ, "loras.0.sha256"),
    ),
    ("fusion-info-list", "fusion-static", put(FJ, "info", [1]), (FJ, "info")),
    ("fusion-gate-null", "fusion-flow", put(FJ, "gate", None), (FJ, "gate", "null")),
    ("fusion-gate-missing", "fusion-flow", drop(FJ, "gate"), (FJ, "gate")),
    ("fusion-gate-k", "fusion-flow", put(FJ, "gate.k", 3), (FJ, "gate.k", "3")),
    ("fusion-gate-k-text", "fusion-flow", put(FJ, "gate.k", "2"), (FJ, "gate.k", "'2'")),
    (
        "fusion-gate-hidden-fraction",
        "fusion-flow",
        put(FJ, "gate.hidden_size", 32.5),
        (FJ, "gate.hidden_size"),
    ),
    ("fusion-gate-temperature-zero", "fusion-flow", put(FJ, "gate.temperature", 0), (FJ, "gate.temperature")),
    (
        "fusion-gate-granularity",
        "fusion-flow",
        put(FJ, "gate.granularity", "token"),
        (FJ, "gate.granularity"),
    ),
    ("fusion-gate-start", "fusion-flow", put(FJ, "gate.start", 7), (FJ, "gate.start", "7")),
    ("fusion-gate-module-no-paths", "fusion-flow", put(FJ, "gate.granularity", "module"), (FJ, "gate")),
    ("fusion-no-weights", "fusion-static", remove(FW), (FW, "missing")),
    (
        "fusion-static-length",
        "fusion-static",
        tensors(FW, reshape("weights", (3,))),
        (FW, "weights", "(3,)", "(2,)"),
    ),
    ("fusion-static-nan", "fusion-static", tensors(FW, poke("weights", nan)), (FW, "weights", "non-finite")),
    ("fusion-static-inf", "fusion-static", tensors(FW, poke("weights", -inf)), (FW, "weights", "non-finite")),
    ("fusion-static-huge", "fusion-static", tensors(FW, poke("weights", 1e30)), (FW, "weights", "1e+30")),
    (
        "fusion-static-extra",
        "fusion-static",
        tensors(FW, lambda s: s.__setitem__("x", torch.zeros(1))),
        (FW, "'x'"),
    ),
    (
        "fusion-gate-bias-nan",
        "fusion-flow",
        tensors(FW, poke("gate.bias", nan)),
        (FW, "gate.bias", "non-finite"),
    ),
    (
        "fusion-cat-logits-shape",
        "fusion-cat",
        tensors(FW, reshape("logits", (5, 2))),
        (FW, "logits", "(5, 2)"),
    ),
    ("fusion-cat-logits-nan", "fusion-cat", tensors(FW, poke("logits", nan)), (FW, "logits", "non-finite")),
    ("fusion-cat-no-paths", "fusion-cat", put(FJ, "module_paths", []), (FJ, "module_paths")),
    ("fusion-cat-paths-numbers", "fusion-cat", put(FJ, "module_paths", [1, 2]), (FJ, "module_paths.0")),
    # mixture.json / router.safetensors
    ("mixture-missing", "mixture", remove(MJ), (MJ, "missing")),
    ("mixture-utf16", "mixture", raw(MJ, '{"format": 1}'.encode("utf-16")), (MJ, "UTF-8")),
    ("mixture-no-config", "mixture", drop(MJ, "config"), (MJ, "config", "required")),
    ("mixture-experts-zero", "mixture", put(MJ, "config.experts", 0), (MJ, "config.experts")),
    ("mixture-experts-text", "mixture", put(MJ, "config.experts", "2"), (MJ, "config.experts", "'2'")),
    ("mixture-alpha-nan", "mixture", put(MJ, "config.alpha", nan), (MJ, "config.alpha", "NaN")),
    ("mixture-alpha-huge", "mixture", put(MJ, "config.alpha", 1e300), (MJ, "config.alpha")),
    ("mixture-rank-fraction", "mixture", put(MJ, "config.rank", 2.5), (MJ, "config.rank", "2.5")),
    ("mixture-rank-disagrees", "mixture", put(MJ, "config.rank", 3), ("e0", "rank 2", "config.rank=3")),
    ("mixture-top-k", "mixture", put(MJ, "config.top_k", 3), (MJ, "config.top_k", "3")),
    ("mixture-router", "mixture", put(MJ, "config.router", "bogus"), (MJ, "config.router", "'bogus'")),
    ("mixture-targets", "mixture", put(MJ, "config.targets", "q_proj"), (MJ, "config.targets")),
    ("mixture-unknown-setting", "mixture", put(MJ, "config.bogus", 1), (MJ, "config.bogus")),
    ("mixture-hidden-fraction", "mixture", put(MJ, "hidden_size", 32.5), (MJ, "hidden_size", "32.5")),
    ("mixture-layers-negative", "mixture", put(MJ, "num_layers", -1), (MJ, "num_layers", "-1")),
    ("mixture-router-missing", "mixture", remove(MW), (MW, "missing")),
    ("mixture-router-nan", "mixture", tensors(MW, poke("weight", nan)), (MW, "weight", "non-finite")),
    (
        "mixture-router-no-weight",
        "mixture",
        tensors(MW, lambda s: s.__setitem__("w", s.pop("weight"))),
        (MW, "weight", "missing"),
    ),
    (
        "mixture-expert-alpha-nan",
        "mixture",
        put("experts/e0/" + CFG, "lora_alpha", nan),
        ("e0", CFG, "lora_alpha"),
    ),
    # encoder.json / encoder.safetensors
    ("encoder-missing", "encoder", remove(EJ), (EJ, "missing")),
    ("encoder-latin1", "encoder", raw(EJ, '{"é": 1}'.encode("latin-1")), (EJ, "UTF-8")),
    (
        "encoder-temperature-nan",
        "encoder",
        put(EJ, "config.temperature", nan),
        (EJ, "config.temperature", "NaN"),
    ),
    ("encoder-temperature-zero", "encoder", put(EJ, "config.temperature", 0), (EJ, "config.temperature")),
    ("encoder-dim-fraction", "encoder", put(EJ, "config.dim", 8.5), (EJ, "config.dim", "8.5")),
    ("encoder-top-k", "encoder", put(EJ, "config.top_k", 5), (EJ, "config.top_k", "5")),
    (
        "encoder-activation",
        "encoder",
        put(EJ, "config.activation", "relu"),
        (EJ, "config.activation", "'relu'"),
    ),
    ("encoder-config-null", "encoder", put(EJ, "config", None), (EJ, "config")),
    ("encoder-basis-empty", "encoder", put(EJ, "basis", {}), (EJ, "basis")),
    ("encoder-basis-path-number", "encoder", put(EJ, "basis.a", 3), (EJ, "basis.a")),
    ("encoder-hidden-wrong", "encoder", put(EJ, "hidden_size", 10**9), (EW, "query", "expected")),
    ("encoder-hidden-text", "encoder", put(EJ, "hidden_size", "32"), (EJ, "hidden_size", "'32'")),
    ("encoder-weights-missing", "encoder", remove(EW), (EW, "missing")),
    ("encoder-query-nan", "encoder", tensors(EW, poke("query", nan)), (EW, "query", "non-finite")),
    ("encoder-keys-shape", "encoder", tensors(EW, reshape("keys", (3, 8))), (EW, "keys", "(3, 8)")),
    # compressed.json / delta.safetensors
    ("compressed-deep", "compressed-low-rank", raw(CJ, '{"a":' * 50_000), (CJ, "nested too deeply")),
    ("compressed-budget-nan", "compressed-low-rank", put(CJ, "budget", nan), (CJ, "budget", "NaN")),
    ("compressed-budget-zero", "compressed-low-rank", put(CJ, "budget", 0), (CJ, "budget", "0")),
    ("compressed-budget-text", "compressed-low-rank", put(CJ, "budget", "1/16"), (CJ, "budget", "'1/16'")),
    ("compressed-no-modules", "compressed-low-rank", put(CJ, "modules", {}), (CJ, "modules")),
    ("compressed-no-method", "compressed-low-rank", drop(CJ, "method"), (CJ, "method", "required")),
    ("compressed-other-missing", "compressed-low-rank", drop(CJ, "other"), ()),  # optional: loads
    (
        "compressed-other-listed",
        "compressed-low-rank",
        put(CJ, "other", ["lm_head.weight"]),
        ("other.safetensors", "missing"),
    ),
    (
        "compressed-kind",
        "compressed-low-rank",
        record("kind", "bogus"),
        (CJ, "kind", "'bogus'"),
    ),
    (
        "compressed-shape",
        "compressed-low-rank",
        record("shape", [32, 65]),
        (CW, MODULE, "(32, 64)"),
    ),
    (
        "compressed-shape-zero",
        "compressed-low-rank",
        record("shape", [0, 64]),
        (CJ, "shape"),
    ),
    (
        "compressed-rank-text",
        "compressed-low-rank",
        record("meta.rank", "5"),
        (CJ, MODULE, "rank"),
    ),
    (
        "compressed-meta-null",
        "compressed-low-rank",
        record("meta", None),
        (CJ, MODULE, "meta"),
    ),
    (
        "compressed-factor-nan",
        "compressed-low-rank",
        tensors(CW, poke(f"{MODULE}.B", nan)),
        (CW, f"{MODULE}.B", "non-finite"),
    ),
    (
        "compressed-factor-shape",
        "compressed-low-rank",
        tensors(CW, reshape(f"{MODULE}.A", (4, 64))),
        (CW, MODULE),
    ),
    (
        "compressed-rtn-bits",
        "compressed-rtn",
        record("meta.bits", 9),
        (CJ, MODULE, "bits"),
    ),
    (
        "compressed-rtn-group-zero",
        "compressed-rtn",
        record("meta.group_size", 0),
        (CJ, MODULE, "group_size"),
    ),
    (
        "compressed-rtn-scales-nan",
        "compressed-rtn",
        tensors(CW, poke(f"{MODULE}.q.scales", nan)),
        (CW, f"{MODULE}.q.scales", "non-finite"),
    ),
    (
        "compressed-rtn-scales-shape",
        "compressed-rtn",
        tensors(CW, reshape(f"{MODULE}.q.scales", (31, 1))),
        (CW, MODULE, "scales"),
    ),
    (
        "compressed-sign-alpha-inf",
        "compressed-bitdelta",
        tensors(CW, poke(f"{MODULE}.alpha", inf)),
        (CW, f"{MODULE}.alpha", "non-finite"),
    ),
    (
        "compressed-sign-cols",
        "compressed-bitdelta",
        record("meta.cols", "64"),
        (CJ, MODULE, "cols"),
    ),
    (
        "compressed-quant-S-nan",
        "compressed-delta-come",
        tensors(CW, poke(f"{MODULE}.S", nan)),
        (CW, f"{MODULE}.S", "non-finite"),
    ),
    (
        "compressed-quant-no-V",
        "compressed-delta-come",
        record("meta.V", []),
        (CJ, MODULE, "V"),
    ),
    (
        "compressed-quant-perm",
        "compressed-delta-come",
        tensors(CW, lambda s: s[f"{MODULE}.V0.perm"].zero_()),
        (CW, MODULE, "perm"),
    ),
    # model checkpoint: config.json / model.safetensors.index.json
    ("ckpt-config-list", "checkpoint", raw("config.json", "[]"), ("config.json", "JSON object")),
    (
        "ckpt-config-nan",
        "checkpoint",
        put("config.json", "rms_norm_eps", nan),
        ("config.json", "rms_norm_eps", "NaN"),
    ),
    ("ckpt-config-utf16", "checkpoint", raw("config.json", "{}".encode("utf-16")), ("config.json", "UTF-8")),
    (
        "ckpt-architectures-text",
        "checkpoint",
        put("config.json", "architectures", "Llama"),
        ("config.json", "architectures"),
    ),
    (
        "ckpt-architectures-numbers",
        "checkpoint",
        put("config.json", "architectures", [1]),
        ("config.json", "architectures.0"),
    ),
    (
        "ckpt-index-list",
        "checkpoint",
        raw("model.safetensors.index.json", "[]"),
        ("index.json", "JSON object"),
    ),
    (
        "ckpt-index-no-map",
        "checkpoint",
        raw("model.safetensors.index.json", "{}"),
        ("index.json", "weight_map"),
    ),
    (
        "ckpt-index-map-numbers",
        "checkpoint",
        raw("model.safetensors.index.json", '{"weight_map": {"a": 1}}'),
        ("index.json", "weight_map.a"),
    ),
    (
        "ckpt-index-outside",
        "checkpoint",
        raw("model.safetensors.index.json", '{"weight_map": {"a": "../x.safetensors"}}'),
        ("index.json", "outside"),
    ),
    (
        "ckpt-weights-header",
        "checkpoint-single",
        header("model.safetensors", {"w": entry(data_offsets=[8, 0])}, bytes(16)),
        ("model.safetensors", "'w'", "end before"),
    ),
    # merge recipes
    (
        "recipe-weight-nan",
        "recipe",
        raw("recipe.yaml", RECIPE.replace("0.5", ".nan")),
        ("recipe.yaml", "models.1.weight", "finite"),
    ),
    (
        "recipe-weight-inf",
        "recipe",
        raw("recipe.yaml", RECIPE.replace("0.5", "-.inf")),
        ("recipe.yaml", "models.1.weight", "finite"),
    ),
    (
        "recipe-weight-1e400",
        "recipe",
        raw("recipe.yaml", RECIPE.replace("0.5", "1e400")),
        ("recipe.yaml", "models.1.weight", "finite"),
    ),
    (
        "recipe-weight-huge",
        "recipe",
        raw("recipe.yaml", RECIPE.replace("0.5", "1.0e300")),
        ("recipe.yaml", "models.1.weight", "±"),
    ),
    (
        "recipe-weight-text",
        "recipe",
        raw("recipe.yaml", RECIPE.replace("0.5", "half")),
        ("recipe.yaml", "models.1.weight", "'half'"),
    ),
    (
        "recipe-weight-bool",
        "recipe",
        raw("recipe.yaml", RECIPE.replace("0.5", "yes")),
        ("recipe.yaml", "models.1.weight", "True"),
    ),
    (
        "recipe-rank-fraction",
        "recipe",
        raw("recipe.yaml", RECIPE + "rank: 4.5\n"),
        ("recipe.yaml", "rank", "4.5"),
    ),
    (
        "recipe-rank-text",
        "recipe",
        raw("recipe.yaml", RECIPE + "rank: '4'\n"),
        ("recipe.yaml", "rank", "'4'"),
    ),
    (
        "recipe-dtype-int",
        "recipe",
        raw("recipe.yaml", RECIPE + "dtype: int8\n"),
        ("recipe.yaml", "dtype", "'int8'"),
    ),
    (
        "recipe-seed-negative",
        "recipe",
        raw("recipe.yaml", RECIPE + "seed: -1\n"),
        ("recipe.yaml", "seed", "-1"),
    ),
    (
        "recipe-union-text",
        "recipe",
        raw("recipe.yaml", RECIPE + "union: 'no'\n"),
        ("recipe.yaml", "union", "'no'"),
    ),
    (
        "recipe-parameter-nan",
        "recipe",
        raw("recipe.yaml", RECIPE + "parameters: {tol: .nan}\n"),
        ("recipe.yaml", "parameters", "tol"),
    ),
    (
        "recipe-parameter-unknown",
        "recipe",
        raw("recipe.yaml", RECIPE + "parameters: {density: 0.5}\n"),
        ("recipe.yaml", "parameters", "density"),
    ),
    (
        "recipe-adapter-nul",
        "recipe",
        raw("recipe.yaml", RECIPE.replace("adapter: a", 'adapter: "a\\0"')),
        ("recipe.yaml", "models.0.adapter"),
    ),
    (
        "recipe-latin1",
        "recipe",
        raw("recipe.yaml", (RECIPE + "# é\n").encode("latin-1")),
        ("recipe.yaml", "UTF-8"),
    ),
    ("recipe-deep", "recipe", raw("recipe.yaml", "[" * 100_000), ("recipe.yaml", "nested too deeply")),
    (
        "recipe-aliases",
        "recipe",
        raw("recipe.yaml", "a: &x [1, 2]\nb: [*x, *x]\n"),
        ("recipe.yaml", "aliases"),
    ),
    (
        "recipe-unknown-method",
        "recipe",
        raw("recipe.yaml", RECIPE.replace("linear", "bogus")),
        ("recipe.yaml", "merge_method", "'bogus'"),
    ),
    # training checkpoint: state.json / state.safetensors
    ("train-state-step-negative", "train-state", put("state.json", "step", -1), ("state.json", "step", "-1")),
    ("train-state-step-text", "train-state", put("state.json", "step", "3"), ("state.json", "step", "'3'")),
    (
        "train-state-losses-text",
        "train-state",
        put("state.json", "result.losses", ["x"]),
        ("state.json", "result.losses.0"),
    ),
    (
        "train-state-no-result",
        "train-state",
        drop("state.json", "result"),
        ("state.json", "result", "required"),
    ),
    (
        "train-state-deep",
        "train-state",
        raw("state.json", "[" * 100_000),
        ("state.json", "nested too deeply"),
    ),
    (
        "train-state-param-shape",
        "train-state",
        tensors("state.safetensors", reshape("param.0", (3,))),
        ("state.safetensors", "param.0", "(3,)"),
    ),
    (
        "train-state-param-nan",
        "train-state",
        tensors("state.safetensors", poke("param.0", nan)),
        ("state.safetensors", "param.0", "non-finite"),
    ),
    (
        "train-state-param-missing",
        "train-state",
        tensors("state.safetensors", lambda s: s.pop("param.0")),
        ("state.safetensors", "param.0", "missing"),
    ),
]


# ---- valid artifacts and their loaders ---------------------------------------------------------


def _fusions(root: Path, adapters: dict[str, Path]) -> dict[str, Path]:
    names = ["plain", "patterned"]
    common: dict[str, Any] = {
        "lora_names": names,
        "lora_paths": {n: str(adapters[n]) for n in names},
        "lora_hashes": {n: adapter_hashes(adapters[n]) for n in names},
        "info": {"base_model": "tiny-llama"},
    }
    g = torch.Generator().manual_seed(0)
    flow = Fusion(
        "lora-flow",
        tensors={"gate.weight": torch.randn(2, 2, 32, generator=g), "gate.bias": torch.zeros(2, 2)},
        gate=GateConfig(k=2, hidden_size=32, num_layers=2),
        **common,
    )
    cat = Fusion(
        "cat-weights",
        tensors={"logits": torch.randn(3, 2, generator=g)},
        module_paths=["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "x"],
        **common,
    )
    static = Fusion("static", tensors={"weights": torch.tensor([0.6, 0.9])}, **common)
    return {
        f"fusion-{kind}": save_fusion(f, root / f"fusion-{kind}")
        for kind, f in (("flow", flow), ("cat", cat), ("static", static))
    }


@pytest.fixture(scope="module")
def artifacts(
    llama_dir: Path, llama_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """One valid folder of every kind a loader reads (built once; cases break copies)."""
    root = tmp_path_factory.mktemp("artifacts")
    found = {"adapter": llama_adapters["plain"], **_fusions(root, llama_adapters)}

    model = load(llama_dir)
    config = MixtureConfig(router="softmax", experts=2, top_k=1, rank=2, alpha=4.0, targets=("q_proj",))
    mixture = Mixture.create(model, config, base_model=str(llama_dir))
    found["mixture"] = mixture.save(root / "mixture")
    mixture.remove()

    basis = {"a": load_lora(llama_adapters["plain"]), "b": load_lora(llama_adapters["patterned"])}
    encoder = InstanceEncoder(32, 2, EncoderConfig(dim=8, seed=1))
    mixing = InstanceMixing(model, basis, encoder)
    paths = {"a": str(llama_adapters["plain"]), "b": str(llama_adapters["patterned"])}
    found["encoder"] = mixing.save(root / "encoder", paths, base_model=str(llama_dir))
    mixing.remove()
    detach(model)

    finetuned = save_model(tiny_llama(1), root / "finetuned")
    for method in ("low-rank", "rtn", "bitdelta", "delta-come"):
        out = root / f"compressed-{method}"
        compress_checkpoint(llama_dir, finetuned, out, method=method, budget="1/4", progress=False)
        found[f"compressed-{method}"] = out
    sharded = root / "checkpoint"
    tiny_llama(0).save_pretrained(sharded, max_shard_size="20KB")
    found["checkpoint"] = sharded
    found["checkpoint-single"] = llama_dir

    (root / "recipe").mkdir()
    (root / "recipe" / "recipe.yaml").write_text(RECIPE)
    found["recipe"] = root / "recipe"

    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(4)
    optimizer.step()
    _Checkpoint(root / "train-state", FINGERPRINT).save(3, [param], optimizer, None, TrainResult([1.0, 0.5]))
    found["train-state"] = root / "train-state"
    return found


def open_artifact(kind: str, folder: Path, llama_dir: Path) -> object:
    """Run the loader of an artifact kind on ``folder``."""
    if kind == "adapter":
        return load_lora(folder)
    if kind.startswith("fusion-"):
        return load_fusion(folder)
    if kind == "mixture":
        return Mixture.load(folder, load(llama_dir))
    if kind == "encoder":
        return read_encoder(folder)
    if kind.startswith("compressed-"):
        return load_compressed(folder)
    if kind.startswith("checkpoint"):
        return open_checkpoint(folder)
    if kind == "recipe":
        return load_recipe(folder / "recipe.yaml")
    if kind == "train-state":
        param = torch.nn.Parameter(torch.zeros(4))
        return _Checkpoint(folder, FINGERPRINT).load([param], torch.optim.AdamW([param]))
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["adapter", "fusion-flow", "fusion-cat", "fusion-static", "mixture", "encoder"]
    + [f"compressed-{m}" for m in ("low-rank", "rtn", "bitdelta", "delta-come")]
    + ["checkpoint", "checkpoint-single", "recipe", "train-state"],
)
def test_valid_artifacts_load(kind: str, artifacts: dict[str, Path], llama_dir: Path) -> None:
    """The intact folders load: every failure below comes from the one thing a case breaks."""
    assert open_artifact(kind, artifacts[kind], llama_dir) is not None


@pytest.mark.parametrize(("case", "kind", "mutate", "expected"), CASES, ids=[c[0] for c in CASES])
def test_hostile_file(
    case: str,
    kind: str,
    mutate: Mutation,
    expected: tuple[str, ...],
    artifacts: dict[str, Path],
    llama_dir: Path,
    tmp_path: Path,
) -> None:
    folder = Path(shutil.copytree(artifacts[kind], tmp_path / kind))
    mutate(folder)
    if not expected:  # a tolerated variation: it must load
        assert open_artifact(kind, folder, llama_dir) is not None
        return
    with pytest.raises(LorafuseError) as info:
        open_artifact(kind, folder, llama_dir)
    message = str(info.value)
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
