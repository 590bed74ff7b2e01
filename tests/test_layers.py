"""Architecture rules from DESIGN.md: imports point downward; tensor maths skips transformers.

Layers, bottom to top: the shared bottom modules (``errors``, ``_io``, ``_hf``, ...); ``adapters``;
``runtime``, ``train``, ``merging``, ``compress``; ``fusion``, ``route``, ``eval``; ``skillworld``
(the world builder); ``studies`` (the studies run on the world); ``serve``; ``cli`` at the top,
which may import everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorafuse"

# layer → lorafuse packages it may import (besides itself and the shared bottom modules).
ALLOWED = {
    "adapters": set(),
    "runtime": {"adapters"},
    "train": set(),
    "merging": {"adapters"},
    "compress": {"adapters"},
    "fusion": {"adapters", "runtime", "train"},
    "route": {"adapters", "runtime", "train"},
    "eval": {"adapters", "runtime"},
    "skillworld": {"adapters", "runtime", "train", "eval"},
    "studies": {
        "adapters",
        "runtime",
        "train",
        "fusion",
        "merging",
        "eval",
        "compress",
        "route",
        "skillworld",
        "library",
    },
    "serve": {"adapters", "runtime", "compress", "fusion"},
    "library": {"adapters", "runtime", "compress", "fusion"},
}
TOP = "cli"  # may import every layer; nothing imports it
BOTTOM = {
    "errors",
    "_io",
    "_data",
    "_checks",
    "_layers",
    "_registry",
    "_extras",
    "_hf",
    "_artefact",
}  # shared by every layer, import nothing of lorafuse but each other
# The artefact protocol sits on the file plumbing only (no other bottom module, no layer).
ARTEFACT_BOTTOM = {"errors", "_io"}
# Top-level modules above every layer: they may import any layer, and no layer imports them.
TOP_MODULES = {
    "artefacts": {"adapters", "compress", "fusion", "route"},
    "export": {"adapters", "compress", "merging", "serve"},
}
PURE_MATHS = [
    "adapters/lora.py",
    "runtime/functional.py",
    "fusion/gate.py",
    "fusion/lorahub.py",
    "fusion/controls.py",
    "route/functional.py",
    "route/arrow.py",
    "merging/functional.py",
    "merging/factored.py",
    *(f"compress/{name}.py" for name in ("packing", "quantize", "budget", "types", "calibrate")),
    *(f"compress/{name}.py" for name in ("deltacome", "lowrank", "bitdelta", "rtn", "registry", "distill")),
]


def lorafuse_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorafuse"):
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else "")
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lorafuse.")}
    return found


@pytest.mark.parametrize("layer", sorted(p.name for p in SRC.iterdir() if p.is_dir() and p.name in ALLOWED))
def test_imports_point_downward(layer: str) -> None:
    for path in (SRC / layer).rglob("*.py"):
        illegal = lorafuse_imports(path) - ALLOWED[layer] - BOTTOM - {layer}
        assert not illegal, f"{path.relative_to(SRC)} imports {sorted(illegal)}, above its layer"


def test_nothing_imports_the_cli() -> None:
    for path in SRC.rglob("*.py"):
        if path.parent.name != TOP and path.name != "__main__.py":
            assert TOP not in lorafuse_imports(path), f"{path.relative_to(SRC)} imports lorafuse.cli"


def test_bottom_modules_import_no_layer() -> None:
    for name in BOTTOM:
        assert lorafuse_imports(SRC / f"{name}.py") <= BOTTOM
    assert lorafuse_imports(SRC / "_artefact.py") <= ARTEFACT_BOTTOM


@pytest.mark.parametrize("name", sorted(TOP_MODULES))
def test_top_modules_import_only_downward(name: str) -> None:
    """``artefacts`` opens every artefact class: it imports layers, and no layer imports it."""
    assert lorafuse_imports(SRC / f"{name}.py") - BOTTOM <= TOP_MODULES[name]
    for layer in ALLOWED:
        for path in (SRC / layer).rglob("*.py"):
            assert name not in lorafuse_imports(path), f"{path.relative_to(SRC)} imports {name}, above it"


@pytest.mark.parametrize("relative", PURE_MATHS)
def test_tensor_maths_imports_no_transformers(relative: str) -> None:
    tree = ast.parse((SRC / relative).read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in modules if m.split(".")[0] in {"transformers", "peft"}}


def _classes(path: Path) -> list[ast.ClassDef]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)]


def _calls_self_base(cls: ast.ClassDef) -> bool:
    """The class calls ``self.base(...)``: it wraps a layer and adds to its output."""
    return any(
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "base"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
        for node in ast.walk(cls)
    )


def test_one_bank_module_class() -> None:
    """Exactly one module wraps a base layer and adds LoRA deltas: ``runtime.bank.LoRABank``."""
    wrappers = [
        f"{path.relative_to(SRC)}:{cls.name}"
        for path in SRC.rglob("*.py")
        for cls in _classes(path)
        if _calls_self_base(cls)
    ]
    assert wrappers == ["runtime/bank.py:LoRABank"]


@pytest.mark.parametrize("layer", ["fusion", "route", "serve"])
def test_weight_rules_install_no_hooks_of_their_own(layer: str) -> None:
    """Layer-input hooks live in ``runtime/layer_input.py``; methods implement only weight rules."""
    for path in (SRC / layer).rglob("*.py"):
        assert "register_forward_pre_hook" not in path.read_text(), path.relative_to(SRC)


def test_serve_holds_no_gate_maths() -> None:
    """Serving weights fusion rows with the fusion's own rule: no gates, no CAT softmax in serve/."""
    for path in (SRC / "serve").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not ({"gate_weights", "FlowGates", "CatWeights", "LoRAFlow"} & (names | imported)), path
        modules = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in modules if m.startswith(("lorafuse.fusion.gate", "lorafuse.fusion.flow"))}, (
            path
        )


# Where a saved fusion, a fusion method or a router is interpreted: by its registry entry only.
NO_METHOD_SWITCHES = [
    "fusion/artefact.py",
    "fusion/api.py",
    "fusion/explain.py",
    "route/mixture.py",
    "serve",
    "cli",
]
METHOD_NAMES = {"lora-flow", "cat-weights", "cat", "static", "lorahub", "average", "remix", "softmax"}


def _compares_method_name(node: ast.AST) -> bool:
    """``x == "lora-flow"`` or ``x in ("lora-flow", ...)`` (a switch on a method string)."""
    if not isinstance(node, ast.Compare):
        return False
    names = []
    for side in (node.left, *node.comparators):
        if isinstance(side, ast.Constant):
            names.append(side.value)
        elif isinstance(side, (ast.Tuple, ast.List, ast.Set)):
            names += [e.value for e in side.elts if isinstance(e, ast.Constant)]
    return any(isinstance(n, str) and n in METHOD_NAMES for n in names)


@pytest.mark.parametrize("relative", NO_METHOD_SWITCHES)
def test_no_code_switches_on_method_strings(relative: str) -> None:
    """Fusion methods, stored fusion kinds and routers own their behaviour (registry entries)."""
    target = SRC / relative
    for path in [target] if target.is_file() else sorted(target.rglob("*.py")):
        hits = [n.lineno for n in ast.walk(ast.parse(path.read_text())) if _compares_method_name(n)]
        assert not hits, f"{path.relative_to(SRC)} switches on a method name at lines {hits}"


def test_public_surface_holds_no_internals() -> None:
    """``lorafuse`` re-exports what users call; banks, sources and the serving pool stay inside."""
    import lorafuse

    assert all(hasattr(lorafuse, name) for name in lorafuse.__all__)
    internals = {
        "LoRABank",
        "StaticWeights",
        "WeightSource",
        "AdapterPool",
        "LayerInputSource",
        "InstanceEncoder",
    }
    assert not internals & set(lorafuse.__all__)
    assert callable(lorafuse.merge) and callable(lorafuse.fuse)
    assert type(lorafuse.merge).__name__ == "function" and type(lorafuse.fuse).__name__ == "function"


def _module_level_cli_imports(path: Path) -> set[str]:
    """The ``lorafuse.cli`` modules ``path`` imports at module level (not inside functions);
    ``"__init__"`` for a name of the package itself (not a submodule)."""
    submodules = {p.stem for p in (SRC / TOP).glob("*.py")} - {"__init__"}
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorafuse.cli"):
            parts = node.module.split(".")
            if len(parts) > 2:
                found.add(parts[2])
            else:
                found |= {a.name if a.name in submodules else "__init__" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("lorafuse.cli.")}
    return found


def test_cli_modules_have_no_import_cycle() -> None:
    """The app is assembled in ``cli/__init__.py`` from one module per verb: no verb module imports
    the package (``from lorafuse.cli import app``), and their module-level imports form no cycle."""
    graph = {p.stem: _module_level_cli_imports(p) for p in (SRC / TOP).glob("*.py")}
    for name, imported in graph.items():
        assert name == "__init__" or "__init__" not in imported, f"cli/{name}.py imports lorafuse.cli itself"
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"import cycle in cli/: {' → '.join((*stack, name))}"
        if name not in done:
            for other in sorted(graph[name] - {"__init__"}):
                visit(other, (*stack, name))
            done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_every_cli_module_imports_in_a_fresh_interpreter() -> None:
    """The ``lorafuse.cli.*`` modules and the entry points (``lorafuse.cli:app``, ``main``) import in
    a new interpreter. One interpreter for all: importing any submodule runs the package's
    ``__init__`` (which imports every verb module) first, so a cycle shows on the first import;
    the static check above finds the cycle's modules."""
    import os
    import subprocess
    import sys

    names = sorted((p.stem for p in (SRC / TOP).glob("*.py") if p.stem != "__init__"), reverse=True)
    code = "; ".join([*(f"import lorafuse.cli.{n}" for n in names), "from lorafuse.cli import app, main"])
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


LOADERS = {
    "AutoModelForCausalLM",
    "AutoModel",
    "AutoTokenizer",
    "PreTrainedTokenizerFast",
    "LlamaForCausalLM",
}


def _from_pretrained_calls(path: Path) -> list[str]:
    """``X.from_pretrained(...)`` calls in ``path`` whose ``X`` loads a model or a tokenizer."""
    return [
        node.func.value.id
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "from_pretrained"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in LOADERS
    ]


def test_one_model_loader_and_one_tokenizer_loader() -> None:
    """Base models and tokenizers are read from a folder in one place: ``_hf.load_model`` and
    ``_hf.load_tokenizer``. Every verb reaches them through ``cli/loading.py`` (its one
    ``load_model`` and one ``load_tokenizer``); the skill world, the studies, ``demo`` and
    ``models`` call ``_hf`` directly.

    Outside ``_hf.py`` no module of ``src/lorafuse`` calls ``AutoModelForCausalLM`` /
    ``AutoTokenizer`` ``.from_pretrained``. Not counted: ``PeftModel.from_pretrained`` (loads an
    adapter onto a model, as PEFT's reference in ``demo``), ``AutoConfig.from_pretrained`` (reads
    a config only, as the layer-by-layer calibration of ``compress`` does), tests and benchmarks.
    """
    callers = {
        str(path.relative_to(SRC)): calls
        for path in SRC.rglob("*.py")
        if (calls := _from_pretrained_calls(path))
    }
    assert callers == {"_hf.py": ["AutoModelForCausalLM", "AutoTokenizer"]}
    cli = {p.stem: p for p in (SRC / TOP).glob("*.py")}
    for name, path in cli.items():
        tree = ast.parse(path.read_text())
        modules = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert ("lorafuse._hf" in modules) == (name == "loading"), f"cli/{name}.py reaches _hf itself"
        assert "transformers" not in modules, f"cli/{name}.py imports transformers"
        defined = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        loaders = [d for d in defined if d in {"load_model", "load_tokenizer", "load_base"}]
        assert loaders == (["load_model", "load_tokenizer", "load_base"] if name == "loading" else []), name
