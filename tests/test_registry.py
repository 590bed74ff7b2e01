"""The one registry helper: names, aliases, papers and settings of every method family."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from pydantic import Field, ValidationError
from typer.testing import CliRunner

from lorafuse import LoRA, LoRAModule
from lorafuse._registry import CANONICAL, FrozenParams, NoParams, Registry
from lorafuse.cli import app
from lorafuse.compress import COMPRESS_METHODS
from lorafuse.errors import CompressError, LorafuseError, UnknownMethodError
from lorafuse.fusion import FUSION_METHODS, WEIGHTINGS, FuseSettings, LoRAFlowParams, LoraHubParams
from lorafuse.merging import MERGE_METHODS, get_method, load_recipe, merge
from lorafuse.route import ROUTINGS
from lorafuse.route.router import Router

BASELINES = {"cat", "magnitude-prune", "rtn", "average", "static"}  # no paper of their own
FAMILIES = [MERGE_METHODS, COMPRESS_METHODS, ROUTINGS, FUSION_METHODS, WEIGHTINGS]


class Settings(FrozenParams):
    size: int = Field(1, ge=1)


@dataclass(frozen=True)
class Thing:
    name: str
    paper: str = "Someone 2024, A Paper, arXiv:0000.00000"
    params: type[FrozenParams] = Settings
    summary: str = "a thing"


def test_register_get_aliases_and_listing() -> None:
    things: Registry[Thing] = Registry("thing")
    flow = things.register(Thing("lora-flow"), aliases=("flow",))
    plain = things.register(Thing("plain"))
    assert things.get("lora-flow") is flow and things["lora_flow"] is flow and things.get("flow") is flow
    assert things.canonical("lora_flow") == "lora-flow" and things.get("plain") is plain
    assert things.names() == ["lora-flow", "plain"] == list(things) == sorted(things)
    assert [n for n, _ in things.items()] == things.names() and len(things) == 2
    assert "lora_flow" in things and "flow" in things and "lora_flux" not in things and 3 not in things
    with pytest.raises(
        UnknownMethodError, match=r"^unknown thing 'lora_flux'; choose one of lora-flow, plain$"
    ):
        things.get("lora_flux")
    with pytest.raises(UnknownMethodError, match="unknown thing"):
        things.get(["lora-flow"])  # type: ignore[arg-type]
    assert issubclass(UnknownMethodError, LorafuseError) and issubclass(UnknownMethodError, ValueError)


def test_register_refuses_duplicates_and_other_spellings() -> None:
    things: Registry[Thing] = Registry("thing")
    things.register(Thing("dare-ties"))
    for clash in (Thing("dare-ties"), Thing("ties"), Thing("other")):
        aliases = ("dare_ties",) if clash.name != "dare-ties" else ()
        with pytest.raises(ValueError, match="registered twice"):
            things.register(clash, aliases=aliases)
    assert things.names() == ["dare-ties"]  # nothing half-registered
    for bad in ("dare_ties", "Dare-Ties", "dare--ties", "-ties", ""):
        with pytest.raises(ValueError, match="not canonical"):
            things.register(Thing(bad))

    class Loose:
        name, paper, summary = "loose", "", ""
        params = dict

    with pytest.raises(TypeError, match="FrozenParams"):
        things.register(Loose())  # type: ignore[arg-type]


def test_frozen_params_are_frozen_and_refuse_unknown_keys() -> None:
    settings = Settings(size=3)
    with pytest.raises(ValidationError):
        settings.size = 4  # type: ignore[misc]
    with pytest.raises(ValidationError, match="sise"):
        Settings(sise=3)  # type: ignore[call-arg]
    assert hash(Settings(size=3)) == hash(settings) and NoParams() == NoParams()
    with pytest.raises(ValidationError):
        NoParams(density=0.5)  # type: ignore[call-arg]


@pytest.mark.parametrize("registry", FAMILIES, ids=lambda r: r.kind)
def test_every_entry_has_a_canonical_name_paper_and_frozen_settings(registry: Registry) -> None:
    assert len(registry) >= 2
    for name, entry in registry.items():
        assert entry.name == name and CANONICAL.match(name)
        assert entry.summary
        assert bool(entry.paper) == (name not in BASELINES), name
        if entry.paper:
            assert any(c.isdigit() for c in entry.paper), entry.paper  # a year and an identifier
        assert issubclass(entry.params, FrozenParams)
        assert entry.params.model_config["frozen"] and entry.params.model_config["extra"] == "forbid"
        entry.params()  # every setting has a default
    assert all("_" not in name for name in registry)  # listings show the canonical spelling only


def test_the_families_names_and_errors() -> None:
    assert MERGE_METHODS.names() == [
        "cat",
        "dare-linear",
        "dare-ties",
        "lego",
        "linear",
        "magnitude-prune",
        "svd",
        "ties",
    ]
    assert COMPRESS_METHODS.names() == ["bitdelta", "delta-come", "low-rank", "rtn"]
    assert ROUTINGS.names() == ["remix", "softmax"]
    assert FUSION_METHODS.names() == ["average", "cat-weights", "lora-flow", "lorahub"]
    assert WEIGHTINGS.names() == ["cat-weights", "lora-flow", "static"]
    assert FUSION_METHODS.aliases() == {
        "cat": "cat-weights",
        "cat_weights": "cat-weights",
        "lora_flow": "lora-flow",
    }
    assert {m.stores for m in FUSION_METHODS.values()} == set(WEIGHTINGS)  # every learned kind is stored
    assert MERGE_METHODS.aliases() == {
        "dare_linear": "dare-linear",
        "dare_ties": "dare-ties",
        "magnitude_prune": "magnitude-prune",
        "task-arithmetic": "linear",
        "task_arithmetic": "linear",
    }
    assert get_method("task_arithmetic") is MERGE_METHODS["linear"]
    assert COMPRESS_METHODS["delta_come"] is COMPRESS_METHODS["delta-come"]
    with pytest.raises(CompressError, match="unknown compression method 'gptq'; choose one of bitdelta, "):
        COMPRESS_METHODS.get("gptq")
    with pytest.raises(UnknownMethodError, match="unknown router 'top1'; choose one of remix, softmax"):
        Router("top1", 2, 8, 4, 2)


def two_loras() -> list[LoRA]:
    g = torch.Generator().manual_seed(0)
    return [
        LoRA(
            {"m.q": LoRAModule(torch.randn(3, 10, generator=g), torch.randn(12, 3, generator=g), 0.5)}, name=n
        )
        for n in ("a", "b")
    ]


@pytest.mark.parametrize("old", ["dare_ties", "dare_linear", "magnitude_prune", "task_arithmetic"])
def test_old_spellings_merge_the_same_and_record_the_canonical_name(old: str) -> None:
    loras, new = two_loras(), MERGE_METHODS.canonical(old)
    params = {} if new == "linear" else {"density": 0.5}
    got = merge(loras, old, [0.7, 0.3], seed=3, progress=False, **params)
    want = merge(loras, new, [0.7, 0.3], seed=3, progress=False, **params)
    assert torch.equal(got["m.q"].A, want["m.q"].A) and torch.equal(got["m.q"].B, want["m.q"].B)
    assert got.metadata["lorafuse"]["recipe"]["merge_method"] == new and got.name == f"{new}(a,b)"


def test_a_recipe_written_before_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"  # the recipe an earlier merge recorded: no convention yet
    path.write_text(
        "merge_method: dare_ties\nmodels: [{adapter: a, weight: 1.0}, {adapter: b, weight: 0.5}]\n"
        "rank: 4\nparameters: {density: 0.5, majority_sign_method: total, svd_iters: 4}\nseed: 0\n"
    )
    recipe = load_recipe(path)
    assert recipe.merge_method == "dare-ties" and recipe.parameters["density"] == 0.5
    path.write_text("merge_method: dare_tie\nmodels: [{adapter: a}]\n")
    with pytest.raises(ValueError, match=r"merge_method.*unknown merge method 'dare_tie'; choose one of cat"):
        load_recipe(path)


def test_cli_takes_old_spellings_and_lists_only_canonical_names(
    llama_adapters: dict[str, Path], tmp_path: Path
) -> None:
    runner = CliRunner()
    a, b = str(llama_adapters["plain"]), str(llama_adapters["patterned"])
    out = tmp_path / "m"
    args = [
        "merge",
        "-m",
        "dare_ties",
        "--density",
        "0.5",
        "--set",
        "convention=mergekit",
        "-o",
        str(out),
        a,
        b,
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    recipe = json.loads((out / "lorafuse.json").read_text())["recipe"]
    assert recipe["merge_method"] == "dare-ties" and recipe["parameters"]["convention"] == "mergekit"
    bogus = runner.invoke(app, ["merge", "-m", "slerp", "-o", str(tmp_path / "x"), a, b])
    assert isinstance(bogus.exception, LorafuseError)  # main() makes it one line and status 2
    assert "one of cat, dare-linear, dare-ties, lego, linear, magnitude-prune, svd, ties;" in str(
        bogus.exception
    )
    assert "dare_" not in runner.invoke(app, ["merge", "--help"]).output


def test_fusion_settings_pick_the_method_and_its_params() -> None:
    """The flat :class:`FuseSettings` resolve to one registered method and its frozen settings."""
    flow = FuseSettings(granularity="module", temperature=2.0, start=None)
    assert flow.method_params() == LoRAFlowParams(granularity="module", temperature=2.0, start=None)
    assert FuseSettings(method="cat").entry is FUSION_METHODS["cat-weights"]
    assert FuseSettings(method="cat").train_config().lr == 1e-2  # CAT's own default budget
    assert FuseSettings(method="lorahub").method_params() == LoraHubParams()
    assert FuseSettings(method="average").method_params() == NoParams()
    with pytest.raises(ValidationError, match="temperature"):
        FuseSettings(temperature=0.0).method_params()
    with pytest.raises(
        UnknownMethodError, match="unknown fusion method 'flow'; choose one of average, cat-weights"
    ):
        _ = FuseSettings(method="flow").entry  # type: ignore[arg-type]
