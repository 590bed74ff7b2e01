"""Which folders of the adapters folder the served model can serve at all, decided when scanned.

A folder of a kind lorafuse cannot serve on this model is not listed in ``/v1/models``; the
reason is logged once and given back (a JSON 404) to any request naming it. Refused here:

- PEFT adapters using features lorafuse does not handle, read from ``adapter_config.json``
  alone: ``target_parameters`` (LoRAs on MoE experts' fused 3-D parameters), DoRA,
  ``modules_to_save``, another ``peft_type``, ... (:func:`lorafuse.adapters.peft_format.read_config_file`);
- compressed deltas that are dense (BitDelta, RTN) or whose modules are not linear layers of the
  served model, as the per-expert weights of a mixture of experts' checkpoint
  (:func:`lorafuse.compress.format.lora_refusal`): a delta is served whole or not at all.

A folder that is merely damaged (truncated weights, bad JSON) stays listed and answers a 400
naming it when used, as before: only what could never be served is decided at scan time.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from lorafuse.adapters.peft_format import read_config_file
from lorafuse.compress.format import META, lora_refusal
from lorafuse.errors import LorafuseError, UnsupportedAdapterError
from lorafuse.serve.registry import Entry


class ServableCheck:
    """``check(entry)``: the reason ``entry`` cannot be served on ``model``, or ``None``."""

    def __init__(self, model: nn.Module) -> None:
        from lorafuse.compress.format import linear_layers

        self.linear: Mapping[str, tuple[int, int]] = linear_layers(model)  # before any bank attaches

    def __call__(self, entry: Entry) -> str | None:
        if entry.kind == "adapter":
            try:
                read_config_file(entry.path)
            except UnsupportedAdapterError as exc:
                return str(exc)
            except (LorafuseError, OSError):
                return None  # damaged, not unsupported: the load names the problem (a 400)
            return None
        if entry.kind == "compressed":
            return self._compressed(entry)
        return None

    def _compressed(self, entry: Entry) -> str | None:
        from lorafuse._io import read_json_file
        from lorafuse.compress.types import KINDS

        try:
            raw = read_json_file(entry.path / META, LorafuseError, what="compressed-delta description")
        except (LorafuseError, OSError):
            return None
        modules = raw.get("modules") if isinstance(raw, dict) else None
        if not isinstance(modules, dict) or not modules:
            return None
        records: dict[str, tuple[str, tuple[int, ...]]] = {}
        for path, record in modules.items():
            kind = record.get("kind") if isinstance(record, dict) else None
            shape = record.get("shape") if isinstance(record, dict) else None
            if kind not in KINDS or not isinstance(shape, list) or not all(isinstance(n, int) for n in shape):
                return None  # malformed: load_compressed names the field
            records[path] = (kind, tuple(shape))
        return lora_refusal(records, str(raw.get("method", "compressed")), self.linear)
