"""Encoding training rows into padded batches, with labels only where the loss belongs.

Three row kinds, the ones TRL's trainers take (:func:`encode_rows` dispatches on the keys):

- ``{"prompt", "completion"}``: ``<s> prompt completion </s>``, loss on ``completion </s>``;
  with ``chat=True`` the prompt is a user turn and the completion the assistant's answer,
  rendered with the tokenizer's chat template (loss on the answer and its end-of-turn tokens);
- ``{"messages": [{"role", "content"}, ...]}``: rendered with the chat template, loss on every
  assistant turn only (:func:`encode_messages`);
- ``{"text"}``: plain language modelling, loss on every token after ``<s>``.

Labels are ``-100`` on the prompt, non-assistant turns and padding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorafuse.errors import LorafuseError

Encoded = tuple[list[int], list[int]]  # (input ids, labels)
ROLES = ("system", "developer", "user", "assistant", "tool")


class DataFormatError(LorafuseError, ValueError):
    """A training row or data file lorafuse cannot encode (missing keys, no chat template, ...)."""


def _bos(tokenizer) -> list[int]:  # type: ignore[no-untyped-def]
    """``[bos]`` where the tokenizer has one (Qwen-style tokenizers have none)."""
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def tokenize(tokenizer, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    """Token ids of ``text`` without special tokens (for the world's tokenizer: one id per word)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(tokenizer, ids: Sequence[int]) -> str:  # type: ignore[no-untyped-def]
    """Text of ``ids``: word-level vocabularies join every token with spaces (as written in the
    data); other tokenizers decode without special tokens. Callers cut at ``</s>`` first."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "WordLevel":
        return " ".join(tokenizer.convert_ids_to_tokens(list(ids)))
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def encode_prompt(tokenizer, text: str, *, chat: bool = False) -> list[int]:  # type: ignore[no-untyped-def]
    """Token ids a model is prompted with: ``<s> text`` as in training, or with ``chat`` the
    tokenizer's chat template around one user turn, ready for the assistant's answer."""
    if not chat:
        return [*_bos(tokenizer), *tokenize(tokenizer, text)]
    return encode_chat(tokenizer, [{"role": "user", "content": text}])


def encode_chat(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:  # type: ignore[no-untyped-def]
    """Token ids of a conversation in the tokenizer's chat template, ready for the assistant's
    answer (the template carries its own special tokens, so none are added)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataFormatError("the tokenizer has no chat template; prompt it without chat")
    rendered = _render(tokenizer, messages, generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def encode_examples(tokenizer, rows: Iterable[dict[str, str]]) -> list[Encoded]:  # type: ignore[no-untyped-def]
    """``<s> prompt completion </s>`` with labels on ``completion </s>`` only.

    Prompt and completion are tokenized apart, so the boundary is exact for any tokenizer.
    """
    out = []
    for row in rows:
        prompt = [*_bos(tokenizer), *tokenize(tokenizer, row["prompt"])]
        completion = [*tokenize(tokenizer, row["completion"]), tokenizer.eos_token_id]
        out.append((prompt + completion, [-100] * len(prompt) + completion))
    return out


def encode_text(tokenizer, lines: Iterable[str]) -> list[Encoded]:  # type: ignore[no-untyped-def]
    """Plain language-model lines: loss on every token after ``<s>``."""
    out = []
    for line in lines:
        bos = _bos(tokenizer)
        ids = [*bos, *tokenize(tokenizer, line), tokenizer.eos_token_id]
        out.append((ids, [-100] * len(bos) + ids[len(bos) :]))
    return out


def _render(tokenizer, messages: Sequence[Mapping[str, str]], *, generation_prompt: bool) -> str:  # type: ignore[no-untyped-def]
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def _check_messages(messages: object, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f'{where}: "messages" must be a non-empty list of {{role, content}}')
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataFormatError(
                f'{where}: messages[{j}] must be {{"role": one of {list(ROLES)}, "content": a string}}'
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"{where}: no assistant turn, so there is nothing to learn")
    if messages[0]["role"] == "assistant":
        raise DataFormatError(f"{where}: the conversation starts with an assistant turn")
    return messages


def encode_messages(tokenizer, messages: Sequence[Mapping[str, str]], *, where: str = "row") -> Encoded:  # type: ignore[no-untyped-def]
    """A conversation rendered with the tokenizer's chat template; labels on assistant turns only.

    For each assistant turn ``i`` the text span it owns is ``[len(render(m[:i], generation
    prompt)), len(render(m[:i+1])))`` of the full rendering: its content and the end-of-turn
    marker the template writes after it (so the model learns to stop), not the role header. The
    full text is tokenized once (templates carry their own special tokens, so none are added)
    and a token is labelled when its characters start inside an assistant span; this is exact
    for BPE tokenizers whose merges cross the span boundary, where tokenizing the pieces apart
    would not be.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataFormatError(
            f'{where}: the tokenizer has no chat template, so {{"messages"}} rows cannot be rendered; '
            'use {"prompt", "completion"} rows or a tokenizer with a chat template'
        )
    messages = list(messages)
    full = _render(tokenizer, messages, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not full.startswith(before) or not full.startswith(through) or len(through) <= len(before):
            raise DataFormatError(
                f"{where}: the chat template does not render turn {i} as a prefix of the whole "
                'conversation, so assistant tokens cannot be located; train on {"prompt", '
                '"completion"} rows instead'
            )
        spans.append((len(before), len(through)))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    labels = [-100] * len(ids)
    for t, (start, end) in enumerate(encoding["offset_mapping"]):
        if end > start and any(lo <= start < hi for lo, hi in spans):
            labels[t] = ids[t]
    return ids, labels


def encode_rows(
    tokenizer,  # type: ignore[no-untyped-def]
    rows: Iterable[Mapping[str, Any]],
    *,
    chat: bool = False,
    source: str = "rows",
) -> list[Encoded]:
    """Encode rows of any of the three kinds (see the module docstring); errors name the row.

    ``chat=True`` renders ``{"prompt", "completion"}`` rows as a user turn and an assistant turn
    with the chat template; ``{"messages"}`` rows always use it.
    """
    out: list[Encoded] = []
    for i, row in enumerate(rows, 1):
        where = f"{source}:{i}"
        if not isinstance(row, Mapping):
            raise DataFormatError(f"{where}: expected an object, got {type(row).__name__}")
        if "messages" in row:
            out.append(encode_messages(tokenizer, _check_messages(row["messages"], where), where=where))
        elif "prompt" in row or "completion" in row:
            prompt, completion = row.get("prompt"), row.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise DataFormatError(f'{where}: "prompt" and "completion" must both be strings')
            if chat:
                turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
                out.append(encode_messages(tokenizer, turns, where=where))
            else:
                out.extend(encode_examples(tokenizer, [{"prompt": prompt, "completion": completion}]))
        elif "text" in row:
            if not isinstance(row["text"], str):
                raise DataFormatError(f'{where}: "text" must be a string')
            out.extend(encode_text(tokenizer, [row["text"]]))
        else:
            raise DataFormatError(
                f'{where}: a row needs "messages", "prompt" and "completion", or "text"; '
                f"got keys {sorted(map(str, row))[:6]}"
            )
        if not any(label != -100 for label in out[-1][1]):
            raise DataFormatError(f"{where}: no token carries a loss (empty completion?)")
    return out


def read_rows(source: str | os.PathLike[str], *, split: str = "train") -> list[dict[str, Any]]:
    """Training rows from a JSONL file, a Parquet / CSV / Arrow file, or a ``datasets`` folder or name.

    JSON lines are read here (errors name the line); other files and saved datasets are loaded
    with the ``datasets`` library (``load_dataset("parquet", data_files=...)``,
    ``load_from_disk``); anything else is taken as a dataset name for ``load_dataset(name,
    split=split)``, which needs the dataset in the local ``datasets`` cache or hub access.
    """
    path = Path(source)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    try:
        import datasets
    except ImportError:
        raise DataFormatError(
            f"{source}: reading it needs the datasets package: pip install datasets"
        ) from None
    builders = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
    try:
        if path.is_file() and path.suffix in builders:
            data = datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
        elif path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json")):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise DataFormatError(f"{source}: no split {split!r}; it has {sorted(data)}")
                data = data[split]
        elif path.exists():
            raise DataFormatError(
                f"{source}: not a data file lorafuse reads (.jsonl, .parquet, .csv, .arrow, or a folder "
                "saved with datasets' save_to_disk)"
            )
        else:
            data = datasets.load_dataset(str(source), split=split)
    except DataFormatError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise DataFormatError(f"{source}: cannot load the data: {type(exc).__name__}: {exc}") from None
    rows = [dict(row) for row in data]
    if not rows:
        raise DataFormatError(f"{source}: no examples")
    return rows


def read_jsonl(
    path: Path, *, where: str | None = None, error: Callable[[str], Exception] = DataFormatError
) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (or a ``.json`` list), each of one of the three kinds.

    Every problem's message starts with ``where`` (default: the path): unreadable or non-UTF-8
    text raise :class:`DataFormatError`; a line that is not JSON or not an object, an object that
    is none of the three kinds (naming the line) and a file without rows raise ``error``. The
    rows' contents are checked when they are encoded (:func:`encode_rows`).
    """
    where = where or str(path)
    try:
        text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except OSError as exc:  # the file itself: always a DataFormatError (one line from the CLI)
        raise DataFormatError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            loaded = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise error(f"{where}: not valid JSON ({exc})") from None
        numbered = list(enumerate(loaded, 1))
    else:
        numbered = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((i, json.loads(line)))
            except (json.JSONDecodeError, RecursionError) as exc:
                raise error(f"{where}:{i}: not JSON ({exc})") from None
    rows: list[dict[str, Any]] = []
    for i, row in numbered:
        if not isinstance(row, dict):
            raise error(f"{where}:{i}: each line must be a JSON object")
        if not (
            "messages" in row
            or "text" in row
            or (isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str))
        ):
            raise error(
                f'{where}:{i}: each line needs "messages", string fields "prompt" and "completion", or "text"'
            )
        rows.append(row)
    if not rows:
        raise error(f"{where}: no examples")
    return rows


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` of shape ``(B, T)``."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for i, (ids, labs) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
