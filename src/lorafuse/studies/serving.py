"""A served adapters folder built from a skill world, and single-request reference generation.

:func:`serving_folder` copies the world's skill LoRAs and adds what a server should handle side
by side: random PEFT-format LoRAs of several ranks and targets, saved fusions (LoRA-Flow gates,
learned CAT weights, static weights), a compressed fine-tuning delta, and a dense (RTN) one that
the server refuses when it scans the folder (``names["not_served"]``). :func:`reference` gives,
for one request, the completion of the plain single-request path (``attach`` or
``Fusion.attach`` + HF ``generate``, batch 1, greedy) that the server's batched answers must equal.
Used by the serving tests and ``bench/serve_load.py``.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafuse._hf import load_model
from lorafuse._layers import find_decoder_layers
from lorafuse.adapters import LoRA, LoRAModule, load_lora, save_lora
from lorafuse.compress import compress_checkpoint, load_compressed
from lorafuse.eval.generate import generate
from lorafuse.fusion.artefact import Fusion, adapter_hashes, load_fusion, save_fusion
from lorafuse.fusion.flow import hidden_size_of
from lorafuse.fusion.gate import GateConfig
from lorafuse.runtime import attach, detach

WORLD_LORAS = ("math", "lang_zorb", "lang_vell", "list", "copy", "reverse")


def random_lora(model: nn.Module, seed: int, rank: int, targets: tuple[str, ...], std: float = 0.4) -> LoRA:
    """A LoRA with both factors ``N(0, std²)`` on every linear layer whose name ends in ``targets``."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in targets:
            A = torch.randn(rank, module.in_features, generator=g) * std  # (r, in)
            B = torch.randn(module.out_features, rank, generator=g) * std  # (out, r)
            modules[path] = LoRAModule(A, B, 2.0)
    return LoRA(modules, None, f"random{seed}", {})


def serving_folder(world: str | Path, out: str | Path, *, random_adapters: int = 6) -> dict[str, Any]:
    """Fill ``out`` with adapters, fusions and a compressed delta for the world in ``world``.

    Returns ``{"adapters": [...], "fusions": [...], "compressed": [...]}`` (the served names).
    """
    world, out = Path(world), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(world / "base")
    names: dict[str, list[str]] = {"adapters": [], "fusions": [], "compressed": [], "not_served": []}
    for name in WORLD_LORAS:
        if (world / "loras" / name).is_dir():
            shutil.copytree(world / "loras" / name, out / name, dirs_exist_ok=True)
            names["adapters"].append(name)
    shapes = [
        ("q_proj", "v_proj"),
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        ("gate_proj", "up_proj", "down_proj"),
    ]
    for i in range(random_adapters):
        lora = random_lora(model, seed=100 + i, rank=2 + 2 * (i % 4), targets=shapes[i % len(shapes)])
        save_lora(lora, out / f"rand{i}")
        names["adapters"].append(f"rand{i}")

    first, second = "rand0", "rand1"
    handle = attach(model, {first: load_lora(out / first), second: load_lora(out / second)})
    layers = len(find_decoder_layers(model)[1])
    paths = list(handle.banks)
    detach(model)
    hidden = hidden_size_of(model)
    g = torch.Generator().manual_seed(7)
    common = {
        "lora_names": [first, second],
        "lora_paths": {n: str(out / n) for n in (first, second)},
        "lora_hashes": {n: adapter_hashes(out / n) for n in (first, second)},
    }
    gate = GateConfig(k=2, hidden_size=hidden, num_layers=layers)
    flow = Fusion(
        method="lora-flow",
        tensors={
            "gate.weight": torch.randn(layers, 2, hidden, generator=g),
            "gate.bias": torch.tensor([[-0.5, 0.5]]).repeat(layers, 1),
        },
        gate=gate,
        **common,
    )
    cat = Fusion(
        method="cat-weights",
        tensors={"logits": torch.randn(len(paths), 2, generator=g)},
        module_paths=paths,
        **common,
    )
    static = Fusion(method="static", tensors={"weights": torch.tensor([0.6, 0.9])}, **common)
    for name, fusion in (("flow", flow), ("catw", cat), ("mix", static)):
        save_fusion(fusion, out / name)
        names["fusions"].append(name)

    finetuned = out.parent / f"{out.name}-finetuned"
    tuned = load_model(world / "base")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for module in tuned.modules():
            if isinstance(module, nn.Linear) and module.weight.shape[0] != tuned.config.vocab_size:
                o, i_ = module.weight.shape
                module.weight += (
                    0.3 * torch.randn(o, 4, generator=g) @ torch.randn(4, i_, generator=g) / i_**0.5
                )
    tuned.save_pretrained(finetuned)
    for name, method in (("tuned", "low-rank"), ("dense", "rtn")):  # rtn is dense: never served (404)
        compress_checkpoint(
            world / "base", finetuned, out / name, method=method, budget="1/4", progress=False
        )
        names["compressed" if method == "low-rank" else "not_served"].append(name)
    shutil.rmtree(finetuned)
    return names


def load_named(folder: Path, name: str) -> LoRA:
    """A served adapter or compressed delta of ``folder`` as a LoRA."""
    if (folder / name / "compressed.json").is_file():
        return load_compressed(folder / name).to_lora(name)
    return load_lora(folder / name, name=name)


@torch.no_grad()
def reference(
    model: nn.Module,
    tokenizer,  # type: ignore[no-untyped-def]
    folder: str | Path,
    request: Mapping[str, Any],
    base_name: str,
) -> str:
    """The completion of ``request`` (``model``, ``prompt``, ``max_tokens``, ``min_tokens``,
    ``compose``) by the single-request path: greedy, batch 1, no padding."""
    folder = Path(folder)
    compose = request.get("compose")
    name = request["model"]
    handle = None
    if isinstance(compose, Mapping):
        handle = attach(model, {n: load_named(folder, n) for n in compose}, dict(compose))
    elif isinstance(compose, str) or (name != base_name and (folder / name / "fusion.json").is_file()):
        fusion = load_fusion(folder / (compose or name))
        handle = fusion.attach(model)
    elif name != base_name:
        handle = attach(model, {name: load_named(folder, name)})
    try:
        return generate(
            model,
            tokenizer,
            [request["prompt"]],
            max_new_tokens=request.get("max_tokens", 16),
            min_new_tokens=request.get("min_tokens", 0),
            batch_size=1,
        )[0]
    finally:
        if handle is not None:
            source = getattr(handle, "fusion_source", None)
            if source is not None and hasattr(source, "remove"):
                source.remove()
            detach(model)
