"""The artefact protocol: every artefact class saves and loads the same way, and `lorafuse.load` opens any.

For each kind (LoRA, fusion, mixture, instance encoder, compressed delta): a save/load round trip
is exact, :func:`lorafuse.load` dispatches on the header, an existing folder is refused unless
``overwrite``, a failing save leaves no partial folder and the previous one intact, folders of
an older version still load (a PEFT folder without lorafuse's header is version 1 of the LoRA
format; fusions, mixtures, encoders and compressed deltas are still at version 1), and a bad
header is one clear error naming the file.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorafuse
from conftest import load, run_cli
from lorafuse import ArtefactError, CompressedDelta, Fusion, InstanceMixing, LoRA, LorafuseError, Mixture
from lorafuse._artefact import FORMATS, Format, artefact_dir, read_header, write_header
from lorafuse.compress import compress_checkpoint
from lorafuse.errors import AdapterFormatError, OutputExistsError, OutputPathError, PickleRefusedError
from lorafuse.fusion.artefact import adapter_hashes
from lorafuse.fusion.instance import EncoderConfig, InstanceEncoder, read_encoder
from lorafuse.route import MixtureConfig
from lorafuse.route.mixture import read_mixture_meta
from lorafuse.runtime import detach
from lorafuse.tiny import save_model, tiny_llama

KINDS = ["lora", "fusion", "mixture", "encoder", "compressed"]
HEADERS = {
    "lora": "adapter_model.safetensors",
    "fusion": "fusion.json",
    "mixture": "mixture.json",
    "encoder": "encoder.json",
    "compressed": "compressed.json",
}
JSON_KINDS = [k for k in KINDS if HEADERS[k].endswith(".json")]
WITH_MODEL = {"mixture", "encoder"}


# ---- one object of every kind ------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tiny_llama(1), tmp_path_factory.mktemp("finetuned") / "model")


def make(kind: str, llama_dir: Path, adapters: dict[str, Path], finetuned: Path) -> Any:
    """A fresh artefact of ``kind`` (mixtures and encoders attached to a fresh tiny Llama)."""
    if kind == "lora":
        return LoRA.load(adapters["plain"])
    if kind == "fusion":
        names = ["plain", "patterned"]
        return Fusion(
            "static",
            names,
            {"weights": torch.tensor([0.25, 0.75])},
            lora_paths={n: str(adapters[n]) for n in names},
            lora_hashes={n: adapter_hashes(adapters[n]) for n in names},
            info={"seed": 3},
        )
    if kind == "mixture":
        config = MixtureConfig(router="softmax", experts=2, top_k=1, rank=2, alpha=4.0, targets=("q_proj",))
        mixture = Mixture.create(load(llama_dir), config, base_model=str(llama_dir))
        with torch.no_grad():  # trained-looking experts and router (B = 0 at creation)
            for bank in mixture.bank.banks.values():
                bank.B.copy_(torch.randn(bank.B.shape, generator=torch.Generator().manual_seed(1)))
            mixture.router.weight.normal_(generator=torch.Generator().manual_seed(2))
        mixture.info = {"examples": 7}
        return mixture
    if kind == "encoder":
        basis = {"a": LoRA.load(adapters["plain"]), "b": LoRA.load(adapters["patterned"])}
        encoder = InstanceEncoder(32, 2, EncoderConfig(dim=8, seed=1))
        return InstanceMixing(
            load(llama_dir), basis, encoder, base_model=str(llama_dir), info={"chat": False}
        )
    assert kind == "compressed"
    return compress_checkpoint(llama_dir, finetuned, method="low-rank", budget="1/4", progress=False)


def reopen(kind: str, folder: Path, llama_dir: Path) -> Any:
    """The kind's own ``load`` classmethod on ``folder``."""
    if kind in WITH_MODEL:
        cls = Mixture if kind == "mixture" else InstanceMixing
        return cls.load(folder, load(llama_dir))
    return {"lora": LoRA, "fusion": Fusion, "compressed": CompressedDelta}[kind].load(folder)


def release(obj: Any) -> None:
    if isinstance(obj, Mixture | InstanceMixing):
        obj.remove()


def tensors_of(kind: str, obj: Any) -> dict[str, torch.Tensor]:
    """Every tensor an artefact holds, by name (what a round trip must keep bit for bit)."""
    if kind == "lora":
        return {f"{p}.{ab}": getattr(m, ab) for p, m in obj.modules.items() for ab in "AB"} | {
            f"{p}.scale": torch.tensor(m.scale) for p, m in obj.modules.items()
        }
    if kind == "fusion":
        return dict(obj.tensors)
    if kind == "mixture":
        banks = {f"{p}.{ab}": getattr(b, ab) for p, b in obj.bank.banks.items() for ab in "AB"}
        return {"router": obj.router.weight.detach(), **banks}
    if kind == "encoder":
        banks = {f"{p}.{ab}": getattr(b, ab) for p, b in obj.bank.banks.items() for ab in "AB"}
        return {**{k: v.detach() for k, v in obj.encoder.state_dict().items()}, **banks}
    found: dict[str, torch.Tensor] = {}
    for path in obj.modules:
        found |= obj.modules[path].to_tensors(path)
    return found


def assert_same(kind: str, a: Any, b: Any) -> None:
    ta, tb = tensors_of(kind, a), tensors_of(kind, b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


@pytest.fixture()
def build(llama_dir: Path, llama_adapters: dict[str, Path], finetuned: Path) -> Callable[[str], Any]:
    made: list[Any] = []

    def builder(kind: str) -> Any:
        obj = make(kind, llama_dir, llama_adapters, finetuned)
        made.append(obj)
        return obj

    yield builder
    for obj in made:
        release(obj)


# ---- round trips and dispatch ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_exact_and_load_dispatches(
    kind: str, build: Callable[[str], Any], llama_dir: Path, tmp_path: Path
) -> None:
    obj = build(kind)
    out = obj.save(tmp_path / kind)
    assert out == tmp_path / kind
    back = reopen(kind, out, llama_dir)
    assert type(back) is type(obj)
    assert_same(kind, obj, back)
    release(back)

    opened = lorafuse.load(out, model=load(llama_dir))
    assert type(opened) is type(obj)
    assert_same(kind, obj, opened)
    release(opened)
    header = read_header(out)
    assert header.path.name == HEADERS[kind]
    assert header.version == FORMATS[header.kind].version
    assert "versions" in header.fields


def test_round_trip_keeps_descriptions(build: Callable[[str], Any], llama_dir: Path, tmp_path: Path) -> None:
    fusion = build("fusion")
    back = Fusion.load(fusion.save(tmp_path / "fusion"))
    assert (back.method, back.lora_names, back.lora_hashes) == (
        fusion.method,
        fusion.lora_names,
        fusion.lora_hashes,
    )
    assert back.info == {"seed": 3}

    mixture = build("mixture")
    again = Mixture.load(mixture.save(tmp_path / "mixture"), load(llama_dir))
    assert again.config == mixture.config and again.info == {"examples": 7}
    again.remove()

    mixing = build("encoder")
    reopened = InstanceMixing.load(mixing.save(tmp_path / "encoder"), load(llama_dir))
    assert reopened.names == ["a", "b"] and reopened.info == {"chat": False}
    assert reopened.basis_paths == mixing.basis_paths and reopened.base_model == str(llama_dir)
    reopened.remove()

    compressed = build("compressed")
    delta = CompressedDelta.load(compressed.save(tmp_path / "compressed"))
    assert (delta.method, delta.budget, delta.params) == (
        compressed.method,
        compressed.budget,
        compressed.params,
    )


def test_saved_lora_stays_a_peft_adapter(
    llama_dir: Path, llama_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """The header rides in the weights file's metadata: PEFT loads the folder unchanged."""
    from peft import PeftModel

    lora = LoRA.load(llama_adapters["plain"])
    out = lora.save(tmp_path / "lora")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    assert json.loads(metadata["lorafuse"])["format"] == "lorafuse-lora"
    peft_model = PeftModel.from_pretrained(load(llama_dir), str(out))
    path = "model.layers.0.self_attn.q_proj"
    module = peft_model.base_model.model.get_submodule(path)
    assert torch.equal(module.lora_A["default"].weight, lora[path].A)
    assert torch.equal(module.lora_B["default"].weight, lora[path].B)


# ---- overwrite and atomic writes ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_overwrite_refused_then_allowed(kind: str, build: Callable[[str], Any], tmp_path: Path) -> None:
    obj = build(kind)
    empty = tmp_path / "empty"
    empty.mkdir()
    obj.save(empty)  # an existing empty folder is taken
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "keep.txt").write_text("previous")
    with pytest.raises(OutputExistsError, match="exists") as info:
        obj.save(out)
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    assert (out / "sub" / "keep.txt").read_text() == "previous"
    obj.save(out, overwrite=True)
    assert not (out / "sub").exists()
    assert read_header(out).path.name == HEADERS[kind]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["tensors", "header"])
def test_failed_save_leaves_nothing_behind(
    kind: str, where: str, build: Callable[[str], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    obj = build(kind)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "content.txt").write_text("previous")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    target = "lorafuse._io.save_file" if where == "tensors" else "lorafuse._artefact.header_text"
    monkeypatch.setattr(target, broken)
    for out, overwrite in ((tmp_path / "new", False), (existing, True)):
        with pytest.raises(OSError, match="disk full"):
            obj.save(out, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"], "no partial folder"
    assert [p.name for p in existing.iterdir()] == ["content.txt"]
    assert (existing / "content.txt").read_text() == "previous"


def test_an_input_is_never_written_over(
    build: Callable[[str], Any], llama_adapters: dict[str, Path], tmp_path: Path
) -> None:
    source = Path(shutil.copytree(llama_adapters["plain"], tmp_path / "source"))
    lora = LoRA.load(source)
    for out in (source, source / "inside"):
        with pytest.raises(OutputPathError, match="source"):
            lora.save(out, overwrite=True)
    fusion = build("fusion")
    with pytest.raises(OutputPathError, match="plain"):
        fusion.save(llama_adapters["plain"] / "fusion", overwrite=True)
    mixing = build("encoder")
    with pytest.raises(OutputPathError):
        mixing.save(llama_adapters["patterned"], overwrite=True)
    mixture = build("mixture")
    with pytest.raises(OutputPathError):
        mixture.save(Path(mixture.base_model) / "mixture", overwrite=True)
    delta = build("compressed")
    folder = delta.save(tmp_path / "delta")
    with pytest.raises(OutputPathError):
        CompressedDelta.load(folder).save(folder, overwrite=True)
    assert LoRA.load(source).modules.keys() == lora.modules.keys()


def test_older_call_forms_keep_their_defaults(build: Callable[[str], Any], tmp_path: Path) -> None:
    """``save_lora``/``save_fusion`` and the record-passing forms of ``Mixture.save`` and
    ``InstanceMixing.save`` still replace an existing folder, as the CLI (``--force``) expects."""
    from lorafuse import save_fusion, save_lora

    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    save_lora(build("lora"), out)
    save_fusion(build("fusion"), out)
    build("mixture").save(out, {"examples": 1})
    mixing = build("encoder")
    mixing.save(out, mixing.basis_paths, extra={"chat": True})
    assert read_encoder(out)[0]["chat"] is True


# ---- older versions ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mixture", "encoder"])
def test_record_sits_beside_the_header(
    kind: str, build: Callable[[str], Any], llama_dir: Path, tmp_path: Path, llama_adapters: dict[str, Path]
) -> None:
    """The caller's record (tokenizer, training settings) is kept at the top level of the header,
    read back into ``info``, and may not shadow the header's own fields."""
    obj = build(kind)
    tokenizer = str(llama_adapters["plain"])  # any existing folder: recorded paths resolve
    obj.info["tokenizer"] = tokenizer
    out = obj.save(tmp_path / kind)
    raw = json.loads((out / HEADERS[kind]).read_text())
    assert raw["tokenizer"] == tokenizer and raw["format"] == FORMATS[read_header(out).kind].kind
    back = reopen(kind, out, llama_dir)
    assert back.info == obj.info
    release(back)
    described = read_mixture_meta(out) if kind == "mixture" else read_encoder(out)[0]
    assert described["tokenizer"] == tokenizer and described["base_model"] == str(llama_dir)
    for key in ("version", "config", "base_model"):
        obj.info = {key: 1}
        with pytest.raises(LorafuseError, match=key):
            obj.save(tmp_path / f"{kind}-{key}")
        assert not (tmp_path / f"{kind}-{key}").exists()


def test_version_1_lora_is_any_peft_folder(llama_adapters: dict[str, Path]) -> None:
    """A PEFT folder without lorafuse's header (PEFT wrote it) is version 1 of the LoRA format."""
    folder = llama_adapters["patterned"]
    header = read_header(folder)
    assert (header.kind, header.version, header.fields) == ("lorafuse-lora", 1, {})
    assert isinstance(lorafuse.load(folder), LoRA)


def test_upgrades_run_in_turn(tmp_path: Path) -> None:
    """A format reads every version from its oldest upgrade on, one step after the other."""
    fmt = Format(
        kind="test-steps",
        version=3,
        header="steps.json",
        noun="test",
        upgrades={1: lambda f, d: {**f, "b": f["a"] + 1}, 2: lambda f, d: {**f, "c": f["b"] * 10}},
    )
    FORMATS[fmt.kind] = fmt
    try:
        (tmp_path / "steps.json").write_text(json.dumps({"format": "test-steps", "version": 1, "a": 1}))
        header = read_header(tmp_path)
        assert (header.version, header.fields) == (1, {"a": 1, "b": 2, "c": 20})
        assert fmt.oldest == 1
        write_header(tmp_path, "test-steps", 3, {"a": 5})
        assert read_header(tmp_path, "test-steps").fields["a"] == 5
        with pytest.raises(ValueError, match="reserved"):
            write_header(tmp_path, "test-steps", 3, {"version": 2})
    finally:
        del FORMATS[fmt.kind]


# ---- bad headers -------------------------------------------------------------------------------


def _one_line(exc: BaseException, *parts: str) -> None:
    message = str(exc)
    assert "\n" not in message.strip(), message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.fixture(scope="module")
def saved(
    llama_dir: Path,
    llama_adapters: dict[str, Path],
    finetuned: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saved")
    found = {}
    for kind in KINDS:
        obj = make(kind, llama_dir, llama_adapters, finetuned)
        found[kind] = obj.save(root / kind)
        release(obj)
    return found


def _edit(path: Path, key: str, value: object) -> None:
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))


BAD_HEADERS = [
    ("unknown-kind", "format", "lorafuse-bogus", ("format", "'lorafuse-bogus'", "unknown artefact kind")),
    ("kind-not-text", "format", 3, ("format", "3")),
    ("future-version", "version", 99, ("version 99", "newer than this lorafuse")),
    ("version-text", "version", "1", ("version", "'1'")),
    ("version-bool", "version", True, ("version", "True")),
    ("version-zero", "version", 0, ("version", "0")),
]


@pytest.mark.parametrize("kind", JSON_KINDS)
@pytest.mark.parametrize(("case", "key", "value", "expected"), BAD_HEADERS, ids=[c[0] for c in BAD_HEADERS])
def test_bad_json_header(
    kind: str,
    case: str,
    key: str,
    value: object,
    expected: tuple[str, ...],
    saved: dict[str, Path],
    llama_dir: Path,
    tmp_path: Path,
) -> None:
    folder = Path(shutil.copytree(saved[kind], tmp_path / kind))
    _edit(folder / HEADERS[kind], key, value)
    for opener in (
        lambda: reopen(kind, folder, llama_dir),
        lambda: lorafuse.load(folder, model=load(llama_dir)),
    ):
        with pytest.raises(ArtefactError) as info:
            opener()
        _one_line(info.value, str(folder / HEADERS[kind]), *expected)


@pytest.mark.parametrize("kind", JSON_KINDS)
def test_missing_header(kind: str, saved: dict[str, Path], llama_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(saved[kind], tmp_path / kind))
    (folder / HEADERS[kind]).unlink()
    with pytest.raises(ArtefactError) as info:
        reopen(kind, folder, llama_dir)
    _one_line(info.value, str(folder), HEADERS[kind], "missing")
    with pytest.raises(ArtefactError) as info:
        lorafuse.load(folder)
    _one_line(info.value, str(folder), "not a lorafuse artefact folder")


WRONG_FIELDS = {
    "fusion": ("method", 5, "method"),
    "mixture": ("num_layers", "2", "num_layers"),
    "encoder": ("basis", ["a"], "basis"),
    "compressed": ("budget", "1/4", "budget"),
}


@pytest.mark.parametrize("kind", JSON_KINDS)
def test_wrong_field_type(kind: str, saved: dict[str, Path], llama_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(saved[kind], tmp_path / kind))
    key, value, field = WRONG_FIELDS[kind]
    _edit(folder / HEADERS[kind], key, value)
    with pytest.raises(ArtefactError) as info:
        lorafuse.load(folder, model=load(llama_dir))
    _one_line(info.value, str(folder / HEADERS[kind]), field)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (json.dumps({"format": "lorafuse-lora", "version": 99}), ("version 99", "newer")),
        (json.dumps({"format": "lorafuse-mixture", "version": 2}), ("format", "expected 'lorafuse-lora'")),
        ("{not json", ("__metadata__.lorafuse", "invalid JSON")),
        (json.dumps([1]), ("JSON object",)),
    ],
)
def test_bad_lora_header(
    text: str, expected: tuple[str, ...], saved: dict[str, Path], tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(saved["lora"], tmp_path / "lora"))
    weights = folder / "adapter_model.safetensors"
    save_file(load_file(weights), str(weights), metadata={"format": "pt", "lorafuse": text})
    for opener in (lambda: LoRA.load(folder), lambda: lorafuse.load(folder)):
        with pytest.raises(AdapterFormatError) as info:
            opener()
        _one_line(info.value, str(weights), *expected)


def test_kind_mismatch_and_missing_model(saved: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ArtefactError) as info:
        Fusion.load(saved["mixture"])
    _one_line(info.value, "fusion.json", "missing")
    with pytest.raises(ArtefactError) as info:
        lorafuse.load(saved["mixture"])
    _one_line(info.value, str(saved["mixture"]), "model=")
    with pytest.raises(ArtefactError) as info:
        lorafuse.load(saved["encoder"])
    _one_line(info.value, "model=")
    with pytest.raises(ArtefactError) as info:
        lorafuse.load(tmp_path / "nowhere")
    _one_line(info.value, "nowhere", "not a folder")
    both = Path(shutil.copytree(saved["fusion"], tmp_path / "both"))
    shutil.copy(saved["mixture"] / "mixture.json", both / "mixture.json")
    with pytest.raises(ArtefactError, match="several artefacts"):
        lorafuse.load(both)


def test_loading_never_runs_pickle(
    saved: dict[str, Path], llama_dir: Path, llama_adapters: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    model = load(llama_dir)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle was loaded")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for kind in KINDS:
        release(lorafuse.load(saved[kind], model=model))
    detach(model)
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(llama_adapters["plain"] / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(PickleRefusedError):
        lorafuse.load(folder)


def test_write_refuses_non_finite_header_values(tmp_path: Path) -> None:
    with pytest.raises(ArtefactError, match="finite"), artefact_dir(tmp_path / "x", overwrite=False) as tmp:
        write_header(tmp, "lorafuse-fusion", 1, {"info": {"loss": float("nan")}})
    assert not (tmp_path / "x").exists()


def test_cli_prints_one_line_for_a_bad_header(
    saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = Path(shutil.copytree(saved["mixture"], tmp_path / "mixture"))
    _edit(folder / "mixture.json", "version", 99)
    code, _, err = run_cli(["route", "generate", "--mixture", folder, "-p", "hello"], capsys)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "mixture.json" in lines[0] and "newer" in lines[0], err


def test_errors_are_lorafuse_errors() -> None:
    assert issubclass(ArtefactError, LorafuseError) and issubclass(AdapterFormatError, ArtefactError)
    from lorafuse.compress.format import CompressedFormatError
    from lorafuse.errors import CompressError
    from lorafuse.fusion.artefact import FusionFormatError

    assert issubclass(CompressedFormatError, CompressError) and issubclass(
        CompressedFormatError, ArtefactError
    )
    assert issubclass(FusionFormatError, ArtefactError)


def test_encoder_basis_folders(
    llama_dir: Path, llama_adapters: dict[str, Path], saved: dict[str, Path], tmp_path: Path
) -> None:
    """An encoder records its basis by folder: one it cannot name is refused; loading may replace one."""
    plain = LoRA.load(llama_adapters["plain"])
    plain.metadata.pop("source")
    mixing = InstanceMixing(load(llama_dir), {"a": plain}, InstanceEncoder(32, 1, EncoderConfig(dim=8)))
    with pytest.raises(LorafuseError, match="basis_paths"):
        mixing.save(tmp_path / "enc")
    assert not (tmp_path / "enc").exists()
    mixing.remove()
    swapped = InstanceMixing.load(saved["encoder"], load(llama_dir), basis={"b": llama_adapters["plain"]})
    assert swapped.basis_paths["b"] == str(llama_adapters["plain"])
    assert swapped.bank.banks["model.layers.0.self_attn.q_proj"].B.shape[1] == 8  # rank 4 + rank 4
    swapped.remove()
    with pytest.raises(ArtefactError, match="name no LoRA"):
        InstanceMixing.load(saved["encoder"], load(llama_dir), basis={"zzz": llama_adapters["plain"]})
