"""The recycling study (arXiv 2602.12323): does choosing LoRAs from a large pool matter for fusion?

The paper's findings, which this study tests on the skill world: which LoRAs are chosen matters
little; random LoRAs do about as well; a fresh LoRA trained on the same few examples is a strong
baseline; transfer needs highly relevant LoRAs.

Design (fixed before any number was seen; nothing here is tuned toward an ordering):

**The pool**, built once per world and cached in ``<world>/recycle/<full|quick>/`` (``pool.json``
records the recipe; a LoRA whose folder is complete is reused), indexed with
:func:`lorafuse.library.index` into ``catalogue.sqlite`` in the same folder. Kinds:

| kind | what | full | quick |
| --- | --- | ---: | ---: |
| ``world`` | the world's skill LoRAs of both families and its pool LoRAs (as built) | 14 | 14 |
| ``subset`` | a seeded half of one task's training set (two per skill, one per pool task) | 22 | 4 |
| ``mixture`` | the union of two or more tasks' training sets (a language with a task, ...) | 12 | 3 |
| ``composite`` | a sample of one composite's ``oracle_train`` (both variants) | 8 | 2 |
| ``irrelevant`` | shuffled corpus text, random words, prompts paired with other rows' answers | 8 | 3 |

Every trained pool LoRA uses the world's own LoRA-training helper
(:func:`lorafuse.skillworld.build.train_lora`) with the world's pool-LoRA recipe, at most 150
steps, at the faithful family's (small) rank, one seed per LoRA. For a composite task, a pool
LoRA trained on that composite's own data is left out of its candidates (so ``all`` is the pool
less those); the LoRAs of the other variant (for the faithful composites: the translate family's
skills and composites) stay in.

**Per composite task** (default: the faithful family's four), with its 200 training examples,
dev set and test set, for every seed (``--seeds``):

- every selection rule of :func:`lorafuse.library.select` (``loss`` and ``similarity`` on the
  200 training examples, ``random`` drawn with the run's seed, ``norm``) × k ∈ {2, 8, all} ×
  {LoraHub, learned CAT (``cat-weights``), LoRA-Flow}, each method's default recipe
  (:mod:`lorafuse.fusion.api`; no per-task grid), fitted on the 200 examples with the dev set
  choosing the checkpoint. The bank holds the chosen LoRAs with the best-ranked one last (LoRA-Flow's
  gate starts on the last LoRA, as it starts on the task LoRA in the paper);
- the control **random weights**: the same three methods over :func:`lorafuse.fusion.random_like`
  redraws (matching std, per module and factor, seeded by the run's seed) of the LoRAs the ``loss``
  rule chose at each k;
- the control **fresh LoRA**: :func:`lorafuse.fusion.train_fresh_lora` on the same 200 examples
  (the recycling study's recipe, the composite's task LoRA's rank);
- scores: exact match (%) on the test split (:func:`lorafuse.eval.evaluate`, greedy; for the
  faithful family the whole answer, the final answer alone recorded beside it) and the mean
  response-token loss on the dev split.

**Output**: every run (composite, seed, rule, k, method, scores, LoRAs chosen) in JSON; Markdown
tables of mean ± std over seeds per rule × k × method plus the controls' rows, one per recorded
score, and a plot of each score against k per rule (:mod:`lorafuse.studies.recycle_report`).
``quick`` shrinks everything (one composite, 8 training / 2 dev / 2 test examples, a few steps)
so that a test runs in seconds on the tiny world; its numbers mean nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lorafuse._data import encode_examples
from lorafuse._io import versions
from lorafuse.adapters import LoRA, load_lora
from lorafuse.eval import evaluate, response_loss
from lorafuse.fusion import FuseSettings, fit_on_bank, random_like, train_fresh_lora
from lorafuse.fusion.api import CAT_TRAIN, FLOW_TRAIN, FRESH_TRAIN
from lorafuse.fusion.lorahub import LoraHubConfig
from lorafuse.library import BY, connect, query, select
from lorafuse.runtime import attach, detach
from lorafuse.skillworld.build import read_manifest
from lorafuse.skillworld.data import (
    ALL_COMPOSITES,
    FAITHFUL_COMPOSITES,
    composite_loras,
    read_jsonl,
)
from lorafuse.skillworld.evaluate import load_world
from lorafuse.studies.recycle_pool import (
    KINDS,
    WORLD_LORAS,
    StudyError,
    build_pool,
    pool_dir,
    pool_plan,
)
from lorafuse.studies.recycle_report import (
    FRESH,
    METHOD_LABELS,
    METRICS,
    RANDOM_WEIGHTS,
    cells,
    format_by_k,
    format_recycle_study,
    metrics_of,
    numbers,
    plot_recycle,
)
from lorafuse.train.loop import TrainConfig

METHODS = ("lorahub", "cat-weights", "lora-flow")


@dataclass(frozen=True)
class RecycleSettings:
    seeds: tuple[int, ...] = (0, 1, 2)
    ks: tuple[int | str, ...] = (2, 8, "all")
    rules: tuple[str, ...] = BY
    methods: tuple[str, ...] = METHODS
    composites: tuple[str, ...] = tuple(FAITHFUL_COMPOSITES)
    limit: int | None = None  # test examples per composite (None: all)
    train_limit: int | None = None  # None: the composite's 200
    dev_limit: int | None = None
    epochs: float = 5.0
    steps: int = 0  # > 0: a fixed number of steps for every trained run instead of ``epochs``
    lorahub_budget: int = 40
    quick: bool = False


def quick_settings(seeds: Sequence[int] = (0,)) -> RecycleSettings:
    """Everything shrunk so a run on the tiny world takes seconds (for tests; numbers mean nothing)."""
    return RecycleSettings(
        seeds=tuple(seeds),
        composites=(FAITHFUL_COMPOSITES[0],),
        limit=2,
        train_limit=8,
        dev_limit=2,
        steps=2,
        lorahub_budget=3,
        quick=True,
    )


# -- the pool --------------------------------------------------------------------------------------
def _train_config(settings: RecycleSettings, method: str, seed: int) -> TrainConfig:
    base = CAT_TRAIN if method == "cat-weights" else FRESH_TRAIN if method == FRESH else FLOW_TRAIN
    if settings.steps > 0:
        return replace(base, steps=settings.steps, epochs=0.0, seed=seed)
    return replace(base, epochs=settings.epochs, seed=seed)


def _fuse_settings(settings: RecycleSettings, method: str, seed: int) -> FuseSettings:
    return FuseSettings(
        method=method,  # type: ignore[arg-type]
        train=_train_config(settings, method, seed),
        seed=seed,
        lorahub=LoraHubConfig(budget=settings.lorahub_budget, seed=seed),
    )


def _k_value(k: int | str, available: int) -> int:
    return available if k == "all" else min(int(k), available)


def _run_key(run: dict[str, Any]) -> tuple[str, int, str, str, str]:
    return (run["composite"], int(run["seed"]), run["rule"], str(run["k"]), run["method"])


def _fingerprint(root: Path, con: Any) -> str:
    """SHA-256 of the world's files (its manifest's hashes) and of every catalogued pool LoRA: a runs
    log is only resumed on the very world and pool it was started on."""
    files = (read_manifest(root) or {}).get("files") or {}
    loras = sorted((r["name"], r["sha256"]) for r in query(con))
    blob = json.dumps({"world": files, "loras": loras}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _settings_record(settings: RecycleSettings) -> dict[str, Any]:
    """The settings a run's numbers depend on (seeds, composites, rules, ks and methods only say
    which runs to make)."""
    record = asdict(settings)
    for key in ("seeds", "composites", "rules", "ks", "methods"):
        record.pop(key)
    return json.loads(json.dumps(record))


def runs_log_path(root: Path, settings: RecycleSettings) -> Path:
    """The default runs log: ``<pool dir>/runs-<digest of the settings>.jsonl``."""
    digest = hashlib.sha256(json.dumps(_settings_record(settings), sort_keys=True).encode()).hexdigest()
    return pool_dir(root, settings.quick) / f"runs-{digest[:12]}.jsonl"


class RunsLog:
    """An append-only JSON-lines record of finished runs, so that an interrupted study resumes.

    Line 1 is ``{"header": {"fingerprint", "settings"}}`` (the settings include torch's thread
    count, which can change a fit's last bits); every other line is one run or one
    selection (``{"selection": composite, "label", "names"}``), written with flush + fsync. A
    last line cut short by an interruption is dropped on reading. A log made on another world,
    pool or settings is refused (:class:`StudyError`), never mixed in.
    """

    def __init__(
        self,
        path: Path,
        fingerprint: str,
        settings: dict[str, Any],
        *,
        resume: bool,
        merge: Sequence[Path] = (),
        read_only: bool = False,
    ) -> None:
        self.path = Path(path)
        self.runs: dict[tuple[str, int, str, str, str], dict[str, Any]] = {}
        self.selections: dict[str, dict[str, list[str]]] = {}
        header = {"fingerprint": fingerprint, "settings": settings}
        if read_only and not merge and not self.path.is_file():
            raise StudyError(f"{self.path}: no runs log here to report on")
        records = self._read(self.path, header) if resume and self.path.is_file() else []
        for record in records:
            self._keep(record)
        for other in merge:  # runs made in parallel (other composites or seeds, same world and settings)
            if Path(other).resolve() == self.path.resolve():
                continue
            if not Path(other).is_file():
                raise StudyError(f"--merge-runs {other}: no such file")
            for record in self._read(Path(other), header):
                if "selection" in record or _run_key(record) not in self.runs:
                    records.append(record)
                    self._keep(record)
        self.read_only = read_only
        if read_only:  # a report of a study under way: its process may be appending to this file
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in [{"header": header}, *records]))
        os.replace(tmp, self.path)  # rewritten whole: a cut-short last line is gone before appending

    @staticmethod
    def _read(path: Path, header: dict[str, Any]) -> list[dict[str, Any]]:
        """The records of the log at ``path`` after its header (a cut-short last line dropped);
        a log whose header is not ``header`` is refused."""
        lines = path.read_text().splitlines()
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break  # cut short by an interruption
                raise StudyError(f"{path}: line {i + 1} is not JSON; move the file aside") from None
        if records and records[0].get("header") != header:
            raise StudyError(
                f"{path}: made on another world, pool or settings; move it aside or pass --no-resume"
            )
        return records[1:]

    def done(self, composite: str, seed: int, rule: str, k: int | str | None, method: str) -> bool:
        return (composite, seed, rule, str(k), method) in self.runs

    def _keep(self, record: dict[str, Any]) -> None:
        if "selection" in record:
            self.selections.setdefault(record["selection"], {})[record["label"]] = record["names"]
        else:
            self.runs[_run_key(record)] = record

    def add(self, record: dict[str, Any]) -> None:
        if self.read_only:
            raise StudyError(f"{self.path}: opened read-only (a report); nothing is written to it")
        self._keep(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


@dataclass
class _Task:
    """One composite's data, excluded LoRAs and rankings (computed once, shared by every seed)."""

    train: Any
    dev: Any
    dev_rows: list[dict[str, str]]
    test_rows: list[dict[str, str]]
    excluded: set[str]
    rank: int
    alpha: int
    ranked: dict[tuple[str, int | None], list[str]]


def recycle_study(
    root: Path,
    settings: RecycleSettings | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    runs_log: Path | None = None,
    resume: bool = True,
    merge_runs: Sequence[Path] = (),
    make_runs: bool = True,
) -> dict[str, Any]:
    """Run the study on the world at ``root`` (see the module docstring); returns a JSON-able result.

    Runs go seed by seed (every composite for seed 0, then seed 1, ...), each appended to the runs
    log (``runs_log``, default :func:`runs_log_path`) as it finishes; with ``resume`` a rerun skips
    the runs the log already holds, so an interrupted study continues where it stopped and gives
    the same numbers (every fit and draw is seeded by its own run). ``merge_runs`` folds the runs
    of other logs of the same world and settings into this one first: a study split over parallel
    processes (``--composites`` or ``--seeds`` apart, each with its own log) is joined this way.
    Without ``make_runs`` nothing is trained: the result holds the runs the log has so far (a
    report of a study still under way; ``"complete"`` says whether every run is in).
    """
    settings = settings or RecycleSettings()
    if not make_runs and not resume:
        raise StudyError("a report of the runs so far needs the log: drop --no-resume")
    started = time.perf_counter()
    root = Path(root)
    pool = build_pool(root, quick=settings.quick, progress=progress, train=make_runs)
    tasks_of = {lo["name"]: set(lo["tasks"]) for lo in pool["loras"]}
    timings: dict[str, list[float]] = {}
    loaded: dict[str, LoRA] = {}
    tasks: dict[str, _Task] = {}

    def timed(part: str, t0: float) -> float:
        spent = time.perf_counter() - t0
        timings.setdefault(part, []).append(round(spent, 3))
        return spent

    def task(composite: str) -> _Task:
        if composite not in tasks:
            _, task_name = composite_loras(composite)
            data = root / "data" / composite
            train_rows = read_jsonl(data / "train.jsonl")[: settings.train_limit]
            dev_rows = read_jsonl(data / "dev.jsonl")[: settings.dev_limit]
            first = next(iter(load_lora(root / "loras" / task_name).modules.values()))
            tasks[composite] = _Task(
                train=encode_examples(tokenizer, train_rows),
                dev=encode_examples(tokenizer, dev_rows),
                dev_rows=dev_rows,
                test_rows=read_jsonl(data / "test.jsonl")[: settings.limit],
                excluded={name for name, t in tasks_of.items() if composite in t},
                rank=int(first.A.shape[0]),
                alpha=round(first.scale * first.A.shape[0]),
                ranked={},
            )
        return tasks[composite]

    def score(scored: torch.nn.Module, t: _Task) -> dict[str, float]:
        t0 = time.perf_counter()
        result = evaluate(scored, tokenizer, t.test_rows)
        out = {"exact_match": round(result["exact_match"], 2)}
        if "final_answer_match" in result:
            out["final_answer_match"] = round(result["final_answer_match"], 2)
        timed("evaluate_test", t0)
        t0 = time.perf_counter()
        out["dev_loss"] = round(response_loss(scored, tokenizer, t.dev_rows), 4)
        timed("dev_loss", t0)
        return out

    n_runs = (
        len(settings.composites)
        * len(settings.seeds)
        * ((len(settings.rules) + 1) * len(settings.ks) * len(settings.methods) + 1)
    )

    with closing(connect(pool["catalogue"], create=False)) as con:
        broken = [r["name"] for r in query(con, status="broken")]
        paths = {r["name"]: r["path"] for r in query(con, status="ok")}
        record = RunsLog(
            runs_log or runs_log_path(root, settings),
            _fingerprint(root, con),
            {**_settings_record(settings), "torch_threads": torch.get_num_threads()},
            resume=resume,
            merge=merge_runs,
            read_only=not make_runs,
        )
        tokenizer, model = load_world(root)
        pad = tokenizer.pad_token_id
        wanted = {
            (c, s, rule, str(k), m)
            for c in settings.composites
            for s in settings.seeds
            for rule in [*settings.rules, RANDOM_WEIGHTS]
            for k in settings.ks
            for m in settings.methods
        } | {(c, s, FRESH, "None", FRESH) for c in settings.composites for s in settings.seeds}
        bar = tqdm(total=n_runs, desc="recycle study", unit="run", disable=not progress)
        resumed = len(wanted & set(record.runs))
        bar.update(resumed)

        def lora(name: str) -> LoRA:
            if name not in loaded:
                loaded[name] = load_lora(paths[name])
            return loaded[name]

        def ranking(composite: str, rule: str, seed: int) -> list[str]:
            t = task(composite)
            key = (rule, seed if rule == "random" else None)
            label = rule if rule != "random" else f"random seed {seed}"
            if key not in t.ranked:
                t0 = time.perf_counter()
                chosen = select(con, rule, model=model, examples=t.train, pad_id=pad, seed=seed)
                timed(f"select_{rule}", t0)
                t.ranked[key] = [r["name"] for r in chosen.ranked if r["name"] not in t.excluded]
            if record.selections.get(composite, {}).get(label) != t.ranked[key]:
                record.add({"selection": composite, "label": label, "names": t.ranked[key]})
            return t.ranked[key]

        def fuse_all(
            composite: str,
            row: str,
            seed: int,
            k: int | str,
            bank: Callable[[], dict[str, LoRA]],
            chosen: list[str],
        ) -> None:
            methods = [m for m in settings.methods if not record.done(composite, seed, row, k, m)]
            if not methods:
                return
            t = task(composite)
            handle = attach(model, bank())
            try:
                for method in methods:
                    t0 = time.perf_counter()
                    fit_on_bank(
                        handle,
                        t.train,
                        t.dev,
                        _fuse_settings(settings, method, seed),
                        pad_id=pad,
                        progress=False,
                    )
                    spent = timed(f"fit_{method}_k{len(chosen)}", t0)
                    record.add(
                        {
                            "composite": composite,
                            "seed": seed,
                            "rule": row,
                            "k": k,
                            "k_used": len(chosen),
                            "method": method,
                            "loras": chosen,
                            **score(model, t),
                            "fit_seconds": round(spent, 2),
                        }
                    )
                    bar.update()
            finally:
                detach(model)

        def study_cell(composite: str, seed: int) -> None:
            for rule in settings.rules:
                names = ranking(composite, rule, seed)
                for k in settings.ks:
                    chosen = names[: _k_value(k, len(names))]
                    fuse_all(
                        composite, rule, seed, k, lambda c=chosen: {n: lora(n) for n in reversed(c)}, chosen
                    )
            names = ranking(composite, "loss", 0)  # the random-weights control redraws the loss rule's choice
            for k in settings.ks:
                chosen = names[: _k_value(k, len(names))]

                def redrawn(c: list[str] = chosen) -> dict[str, LoRA]:
                    return {n: random_like(lora(n), 1_000_003 * seed + i) for i, n in enumerate(reversed(c))}

                fuse_all(composite, RANDOM_WEIGHTS, seed, k, redrawn, chosen)
            if record.done(composite, seed, FRESH, None, FRESH):
                return
            t = task(composite)
            t0 = time.perf_counter()
            fresh = train_fresh_lora(
                model,
                t.train,
                t.dev,
                _train_config(settings, FRESH, seed),
                pad_id=pad,
                rank=t.rank,
                alpha=t.alpha,
                progress=False,
            )
            spent = timed("fresh_lora", t0)
            record.add(
                {
                    "composite": composite,
                    "seed": seed,
                    "rule": FRESH,
                    "k": None,
                    "k_used": 0,
                    "method": FRESH,
                    "loras": [],
                    **score(fresh, t),
                    "fit_seconds": round(spent, 2),
                    "rank": t.rank,
                }
            )
            del fresh
            bar.update()

        for seed in settings.seeds if make_runs else ():
            for composite in settings.composites:
                study_cell(composite, seed)
            if log:
                log(f"seed {seed}: {sum(1 for key in record.runs if key[1] == seed)} runs")
        bar.close()
    runs = [record.runs[key] for key in sorted(wanted, key=_order(settings)) if key in record.runs]
    selections = {c: dict(record.selections.get(c, {})) for c in settings.composites}
    return {
        "study": "recycle",
        "metric": "exact match (%) on the test split; dev loss: mean response-token loss on the dev split",
        "settings": {**asdict(settings), "ks": [str(k) for k in settings.ks]},
        "composites": list(settings.composites),
        "seeds": list(settings.seeds),
        "rules": list(settings.rules),
        "methods": list(settings.methods),
        "ks": [str(k) for k in settings.ks],
        "pool": {**pool, "broken": broken},
        "selections": selections,
        "runs": runs,
        "runs_log": str(record.path),
        "resumed_runs": resumed,
        "complete": len(runs) == len(wanted),
        "timings": {
            part: {"n": len(v), "mean_s": round(statistics.mean(v), 3)} for part, v in timings.items()
        },
        "versions": versions(),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _order(settings: RecycleSettings) -> Callable[[tuple[str, int, str, str, str]], tuple[int, ...]]:
    """Sort runs as a fresh study makes them: seed, composite, rule (controls last), k, method."""
    rules = [*settings.rules, RANDOM_WEIGHTS, FRESH]
    ks = [str(k) for k in settings.ks] + ["None"]
    methods = [*settings.methods, FRESH]

    def key(run: tuple[str, int, str, str, str]) -> tuple[int, ...]:
        composite, seed, rule, k, method = run
        return (
            settings.seeds.index(seed),
            settings.composites.index(composite),
            rules.index(rule),
            ks.index(k),
            methods.index(method),
        )

    return key


__all__ = [
    "ALL_COMPOSITES",
    "FRESH",
    "KINDS",
    "METHODS",
    "METHOD_LABELS",
    "METRICS",
    "RANDOM_WEIGHTS",
    "WORLD_LORAS",
    "RecycleSettings",
    "StudyError",
    "build_pool",
    "cells",
    "format_by_k",
    "format_recycle_study",
    "metrics_of",
    "numbers",
    "plot_recycle",
    "pool_plan",
    "quick_settings",
    "recycle_study",
]
