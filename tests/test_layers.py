"""Architecture rules from DESIGN.md: imports point downward; tensor maths skips transformers."""

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
    "skillworld": {"adapters", "runtime", "train", "fusion", "merging", "eval", "compress", "route"},
    "serve": {"adapters", "runtime", "compress", "fusion"},
}
BOTTOM = {
    "errors",
    "_io",
    "_data",
    "_checks",
    "_layers",
    "_registry",
    "_artefact",
}  # shared by every layer, import nothing of lorafuse but each other
# The artefact protocol sits on the file plumbing only (no other bottom module, no layer).
ARTEFACT_BOTTOM = {"errors", "_io"}
# Top-level modules above every layer: they may import any layer, and no layer imports them.
TOP = {"artefacts": {"adapters", "compress", "fusion", "route"}}
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


def test_bottom_modules_import_no_layer() -> None:
    for name in BOTTOM:
        assert lorafuse_imports(SRC / f"{name}.py") <= BOTTOM
    assert lorafuse_imports(SRC / "_artefact.py") <= ARTEFACT_BOTTOM


@pytest.mark.parametrize("name", sorted(TOP))
def test_top_modules_import_only_downward(name: str) -> None:
    """``artefacts`` opens every artefact class: it imports layers, and no layer imports it."""
    assert lorafuse_imports(SRC / f"{name}.py") - BOTTOM <= TOP[name]
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
