"""Reading HuggingFace checkpoint folders tensor by tensor, and pairing a base with a fine-tune.

A checkpoint is ``config.json`` plus ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Only headers are read up front (names, shapes, dtypes); each
tensor is then read on its own through ``safe_open``, so comparing two 7B models holds two
tensors in memory, never two models. Pickle checkpoints are refused.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from safetensors import safe_open
from torch import Tensor

from lorafuse._checks import parse_model
from lorafuse._io import read_json_file, read_safetensors_header
from lorafuse.errors import CompressError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# 2-D weights that are not attention/MLP projections: kept as they are (or stored as plain deltas).
NOT_LINEAR = ("embed", "wte", "wpe", "lm_head", "norm", "ln_")


@dataclass(frozen=True)
class Checkpoint:
    root: Path
    config: dict
    shards: dict[str, Path]  # tensor name → shard file
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return ",".join(archs)


class _ModelConfig(BaseModel):
    """The fields of a model's ``config.json`` read here (the rest is passed through)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    architectures: list[Annotated[str, StringConstraints(strict=True)]] | None = None
    model_type: Annotated[str, StringConstraints(strict=True)] | None = None


class _ShardIndex(BaseModel):
    """``model.safetensors.index.json``: which shard file holds each tensor."""

    model_config = ConfigDict(frozen=True, extra="allow")
    weight_map: Annotated[
        dict[str, Annotated[str, StringConstraints(strict=True, min_length=1)]], Field(min_length=1)
    ]


def _inside(root: Path, name: str) -> bool:
    """``name`` is a relative path that stays inside ``root`` (no ``..``, not absolute)."""
    path = Path(name)
    return not path.is_absolute() and ".." not in path.parts


def open_checkpoint(root: str | Path) -> Checkpoint:
    """Read ``config.json`` and every shard's header; errors name the missing or broken file."""
    root = Path(root)
    if not (root / "config.json").is_file():
        raise CompressError(f"{root}: no config.json; expected a HuggingFace model folder")
    config = read_json_file(root / "config.json", CompressError, what="model config")
    if not isinstance(config, dict):
        raise CompressError(f"{root / 'config.json'}: expected a JSON object, got {type(config).__name__}")
    parse_model(_ModelConfig, config, str(root / "config.json"), CompressError)
    if (root / INDEX).is_file():
        index = read_json_file(root / INDEX, CompressError, what="shard index")
        weight_map = parse_model(_ShardIndex, index, str(root / INDEX), CompressError).weight_map
        outside = sorted(f for f in set(weight_map.values()) if not _inside(root, f))
        if outside:
            raise CompressError(
                f"{root / INDEX}: weight_map names shard(s) outside the model folder: {outside[:3]}"
            )
        files = sorted(set(weight_map.values()))
    elif (root / SINGLE).is_file():
        files, weight_map = [SINGLE], None
    else:
        pickles = sorted(p.name for p in root.glob("*.bin"))
        hint = (
            f" (found {pickles}; pickle checkpoints are not read, convert to safetensors)" if pickles else ""
        )
        raise CompressError(f"{root}: neither {SINGLE} nor {INDEX}{hint}")
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise CompressError(
            f"{root}: {INDEX} lists shard(s) that are missing: {', '.join(missing)}; the download or "
            "copy is incomplete"
        )
    shards: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for name in files:
        try:
            header = read_safetensors_header(root / name)
        except Exception as exc:
            raise CompressError(str(exc)) from None
        for key, info in header.items():
            shards[key] = root / name
            shapes[key] = tuple(info["shape"])
            dtypes[key] = info["dtype"]
    if weight_map is not None:
        lost = sorted(k for k, f in weight_map.items() if shards.get(k) != root / f)
        if lost:
            raise CompressError(f"{root}: tensors listed in {INDEX} are not in their shards: {lost[:5]}")
    return Checkpoint(root, config, shards, shapes, dtypes)


def is_linear(name: str, shape: tuple[int, ...]) -> bool:
    """An attention or MLP projection weight (``nn.Linear`` layout ``(out, in)``)."""
    return len(shape) == 2 and name.endswith(".weight") and not any(t in name for t in NOT_LINEAR)


def check_pair(base: Checkpoint, finetuned: Checkpoint) -> None:
    """Same architecture, same tensor names and shapes; one error listing every difference."""
    problems = []
    if base.architecture != finetuned.architecture:
        problems.append(
            f"architectures differ: base {base.architecture}, fine-tuned {finetuned.architecture}"
        )
    only_base = sorted(set(base.shapes) - set(finetuned.shapes))
    only_ft = sorted(set(finetuned.shapes) - set(base.shapes))
    if only_base:
        problems.append(
            f"tensors only in the base: {', '.join(only_base[:5])}" + (" ..." if len(only_base) > 5 else "")
        )
    if only_ft:
        problems.append(
            f"tensors only in the fine-tune: {', '.join(only_ft[:5])}" + (" ..." if len(only_ft) > 5 else "")
        )
    for key in sorted(set(base.shapes) & set(finetuned.shapes)):
        if base.shapes[key] != finetuned.shapes[key]:
            problems.append(
                f"{key}: base {base.shapes[key]} ({base.shards[key].name}), fine-tuned "
                f"{finetuned.shapes[key]} ({finetuned.shards[key].name})"
            )
    if problems:
        shown = "\n  ".join(problems[:12]) + (
            f"\n  and {len(problems) - 12} more" if len(problems) > 12 else ""
        )
        raise CompressError(
            f"{finetuned.root} is not a fine-tune of {base.root}:\n  {shown}\nBoth must have the same "
            "architecture and tensor shapes."
        )


class ShardReader:
    """Tensors of a checkpoint by name, each read on its own, one shard open at a time.

    safetensors maps a shard into memory and the pages read stay resident while it is open, so
    holding every shard open would make resident memory grow with the checkpoint; reading in
    shard order (layer by layer) opens each shard once. Use it as a context manager.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._shard: Path | None = None
        self._handle: Any = None

    def get(self, key: str) -> Tensor:
        shard = self.checkpoint.shards[key]
        if shard != self._shard:
            self.close()
            self._handle = safe_open(str(shard), framework="pt", device="cpu").__enter__()
            self._shard = shard
        return self._handle.get_tensor(key)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._shard, self._handle = None, None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_pairs(
    base: Checkpoint, finetuned: Checkpoint, *, skip: Collection[str] = ()
) -> Iterator[tuple[str, Tensor, Tensor]]:
    """``(name, base tensor, fine-tuned tensor)``, one pair in memory at a time, in the fine-tune's
    shard order; names in ``skip`` are not read. Only one shard of each checkpoint is open."""
    keys = sorted(finetuned.shapes, key=lambda k: (str(finetuned.shards[k]), k))
    with ShardReader(base) as read_base, ShardReader(finetuned) as read_ft:
        for key in keys:
            if key not in skip:
                yield key, read_base.get(key), read_ft.get(key)


def iter_tensors(ckpt: Checkpoint) -> Iterator[tuple[Path, dict[str, Tensor]]]:
    """Every shard's tensors, one shard at a time (for writing a model back shard by shard)."""
    for shard in sorted(set(ckpt.shards.values())):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            yield shard, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
