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
score (:func:`format_recycle_study`); a plot of each score against k per rule
(:func:`plot_recycle`).
``quick`` shrinks everything (one composite, 8 training / 2 dev / 2 test examples, a few steps)
so that a test runs in seconds on the tiny world; its numbers mean nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
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
from lorafuse._io import atomic_output_dir, versions
from lorafuse.adapters import LoRA, load_lora
from lorafuse.errors import LorafuseError
from lorafuse.eval import evaluate, response_loss
from lorafuse.fusion import FuseSettings, fit_on_bank, random_like, train_fresh_lora
from lorafuse.fusion.api import CAT_TRAIN, FLOW_TRAIN, FRESH_TRAIN
from lorafuse.fusion.lorahub import LoraHubConfig
from lorafuse.library import BY, connect, index, query, select
from lorafuse.runtime import attach, detach
from lorafuse.skillworld.build import PROFILES, read_manifest, train_lora, world_threads
from lorafuse.skillworld.data import (
    ALL_COMPOSITES,
    COMPOSITES,
    FAITHFUL_COMPOSITES,
    FAITHFUL_SKILLS,
    POOL,
    SKILLS,
    composite_loras,
    read_jsonl,
)
from lorafuse.skillworld.evaluate import load_world
from lorafuse.train.loop import TrainConfig

METHODS = ("lorahub", "cat-weights", "lora-flow")
METHOD_LABELS = {"lorahub": "LoraHub", "cat-weights": "learned CAT", "lora-flow": "LoRA-Flow"}
KINDS = ("world", "subset", "mixture", "composite", "irrelevant")
RANDOM_WEIGHTS = "random weights (loss's choice)"
FRESH = "fresh LoRA"
POOL_STEPS = 150  # at most, per trained pool LoRA
WORLD_LORAS = [*SKILLS, *FAITHFUL_SKILLS, *POOL]
MIXTURES = [
    ("math", "lang_zorb"),
    ("math", "lang_vell"),
    ("list", "lang_zorb"),
    ("list", "lang_vell"),
    ("math_worded", "chat_zorb"),
    ("math_worded", "chat_vell"),
    ("list_worded", "chat_zorb"),
    ("list_worded", "chat_vell"),
    ("math", "list"),
    ("math_worded", "list_worded"),
    ("chat_zorb", "chat_vell"),
    tuple(POOL),
]


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
def pool_plan(quick: bool) -> list[dict[str, Any]]:
    """The trained part of the pool: ``{"name", "kind", "tasks", "data", "seed"}`` per LoRA.

    ``data`` says how the training rows are drawn: ``half`` (a seeded half of each task's train
    set), ``all`` (the union), ``oracle`` (a sample of a composite's oracle set), ``shuffled`` /
    ``random`` / ``mismatched`` (irrelevant text).
    """
    plan: list[dict[str, Any]] = []
    skills = [*SKILLS, *FAITHFUL_SKILLS]
    subsets = (
        [(t, i) for t in skills[:4] for i in range(1)]
        if quick
        else [
            *((t, i) for t in skills for i in range(2)),
            *((t, 0) for t in POOL),
        ]
    )
    for task, i in subsets:
        plan.append({"name": f"subset-{task}-{i}", "kind": "subset", "tasks": [task], "data": "half"})
    for mix in MIXTURES[:3] if quick else MIXTURES:
        name = "mix-pool" if mix == tuple(POOL) else "mix-" + "+".join(mix)
        plan.append({"name": name, "kind": "mixture", "tasks": list(mix), "data": "all"})
    composites = ["math_worded_vell", "math_zorb"] if quick else [*FAITHFUL_COMPOSITES, *COMPOSITES]
    for composite in composites:
        plan.append(
            {"name": f"comp-{composite}", "kind": "composite", "tasks": [composite], "data": "oracle"}
        )
    irrelevant = (
        [("shuffled", 0), ("random", 0), ("mismatched", 0)]
        if quick
        else [
            *(("shuffled", i) for i in range(3)),
            *(("random", i) for i in range(3)),
            ("mismatched", 0),
            ("mismatched", 1),
        ]
    )
    for data, i in irrelevant:
        tasks = (
            ["math_worded"] if data == "mismatched" and i == 0 else ["list"] if data == "mismatched" else []
        )
        plan.append(
            {"name": f"irr-{data}-{i}", "kind": "irrelevant", "tasks": [], "source": tasks, "data": data}
        )
    for n, entry in enumerate(plan):
        entry["seed"] = 7_000 + n
    return plan


def _pool_rows(root: Path, entry: dict[str, Any], vocab: list[str], size: int) -> list[dict[str, str]]:
    """The training rows of one planned pool LoRA (deterministic from its seed)."""
    rng = random.Random(entry["seed"])
    data = root / "data"
    kind = entry["data"]
    if kind == "half":
        rows = read_jsonl(data / entry["tasks"][0] / "train.jsonl")
        return rng.sample(rows, len(rows) // 2)
    if kind == "all":
        rows = [r for t in entry["tasks"] for r in read_jsonl(data / t / "train.jsonl")]
        rng.shuffle(rows)
        return rows
    if kind == "oracle":
        rows = read_jsonl(data / entry["tasks"][0] / "oracle_train.jsonl")
        return rng.sample(rows, min(len(rows), size))
    if kind == "mismatched":  # a task's prompts, each with another row's answer
        rows = read_jsonl(data / entry["source"][0] / "train.jsonl")
        answers = [r["completion"] for r in rows]
        rng.shuffle(answers)
        return [{"prompt": r["prompt"], "completion": a} for r, a in zip(rows, answers, strict=True)]
    if kind == "shuffled":  # the base's corpus, words shuffled within each line
        lines = [ln.split() for ln in (data / "pretrain.txt").read_text().splitlines() if len(ln.split()) > 3]
        out = []
        for words in rng.sample(lines, min(len(lines), size)):
            rng.shuffle(words)
            half = len(words) // 2
            out.append({"prompt": " ".join(words[:half]), "completion": " ".join(words[half:])})
        return out
    if kind == "random":  # words drawn uniformly from the vocabulary
        return [
            {
                "prompt": " ".join(rng.choices(vocab, k=rng.randint(4, 12))),
                "completion": " ".join(rng.choices(vocab, k=rng.randint(4, 12))),
            }
            for _ in range(size)
        ]
    raise ValueError(f"unknown pool data {kind!r}")


def pool_dir(root: Path, quick: bool) -> Path:
    return Path(root) / "recycle" / ("quick" if quick else "full")


def _profile(root: Path) -> Any:
    return PROFILES[str((read_manifest(root) or {}).get("profile", "default"))]


def _pool_recipe(root: Path, quick: bool) -> dict[str, Any]:
    manifest = read_manifest(root) or {}
    spec = _profile(root)
    config = replace(spec.pool_lora, steps=min(spec.pool_lora.steps, POOL_STEPS))
    return {
        "format": 1,
        "quick": quick,
        "world_seed": manifest.get("seed"),
        "train": asdict(config),
        "rank": spec.faithful_lora_rank,
        "alpha": spec.faithful_lora_alpha,
        "sample": 1000,
        "plan": pool_plan(quick),
    }


def build_pool(
    root: Path, *, quick: bool = False, progress: bool = True, train: bool = True
) -> dict[str, Any]:
    """Train (or reuse) the pool's LoRAs and index them with the world's into the catalogue
    (without ``train``, a pool that is not complete is a :class:`StudyError`).

    Returns ``{"dir", "catalogue", "loras": [{"name", "kind", "tasks", "path"}], "seconds",
    "train_seconds": {name: s}, "index": {...}}``.
    """
    started = time.perf_counter()
    out = pool_dir(root, quick)
    recipe = json.loads(json.dumps(_pool_recipe(root, quick)))  # as pool.json holds it (lists, not tuples)
    record = out / "pool.json"
    old = json.loads(record.read_text()) if record.is_file() else {}
    seconds: dict[str, float] = dict(old.get("train_seconds", {})) if old.get("recipe") == recipe else {}
    (out / "loras").mkdir(parents=True, exist_ok=True)
    tokenizer, base = None, None
    todo = [
        e
        for e in recipe["plan"]
        if e["name"] not in seconds or not (out / "loras" / e["name"] / "adapter_model.safetensors").is_file()
    ]
    if todo and not train:
        raise StudyError(f"{out}: the pool is not built yet ({len(todo)} LoRAs missing); run the study first")
    if todo:
        tokenizer, base = load_world(root)
        base.train()
        vocab = [w for w in tokenizer.get_vocab() if not (w.startswith("<") and w.endswith(">"))]
        vocab.sort()
        config = TrainConfig(**recipe["train"])
        bar = tqdm(todo, desc="recycle pool", unit="lora", disable=not progress)
        # the pool belongs to the world: its bits follow the world's thread count, not the study's
        with world_threads(_profile(root)):
            for entry in bar:
                t0 = time.perf_counter()
                rows = _pool_rows(root, entry, vocab, recipe["sample"])
                with atomic_output_dir(out / "loras" / entry["name"]) as tmp:
                    train_lora(
                        base,
                        tokenizer,
                        rows,
                        replace(config, seed=entry["seed"]),
                        _profile(root),
                        tmp,
                        desc=f"pool {entry['name']}",
                        rank=recipe["rank"],
                        alpha=recipe["alpha"],
                    )
                seconds[entry["name"]] = round(time.perf_counter() - t0, 2)
                record.write_text(json.dumps({"recipe": recipe, "train_seconds": seconds}, indent=2) + "\n")
        bar.close()
    record.write_text(json.dumps({"recipe": recipe, "train_seconds": seconds}, indent=2) + "\n")
    if base is None:
        _, base = load_world(root)
    t0 = time.perf_counter()
    catalogue = out / "catalogue.sqlite"
    world_folders = [root / "loras" / name for name in WORLD_LORAS]
    report = index(catalogue, [out / "loras", *world_folders], base=base, progress=False)
    loras = [
        {"name": name, "kind": "world", "tasks": [name], "path": str(root / "loras" / name)}
        for name in WORLD_LORAS
    ] + [
        {"name": e["name"], "kind": e["kind"], "tasks": e["tasks"], "path": str(out / "loras" / e["name"])}
        for e in recipe["plan"]
    ]
    return {
        "dir": str(out),
        "catalogue": str(catalogue),
        "loras": loras,
        "kinds": {kind: sum(1 for lo in loras if lo["kind"] == kind) for kind in KINDS},
        "train_seconds": seconds,
        "index": {**asdict(report), "seconds": round(time.perf_counter() - t0, 2)},
        "seconds": round(time.perf_counter() - started, 1),
    }


# -- the study -------------------------------------------------------------------------------------
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


class StudyError(LorafuseError, ValueError):
    """A runs log that cannot be resumed."""


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


# -- report ----------------------------------------------------------------------------------------
def numbers(result: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The study's numbers without timings: what a rerun with the same seeds must reproduce."""
    keys = ("composite", "seed", "rule", "k", "method", "exact_match", "final_answer_match", "dev_loss")
    return [tuple(json.dumps(r.get(key)) for key in keys) + tuple(r["loras"]) for r in result["runs"]]


#: The scores every run records: key → (label, format of a cell).
METRICS = {
    "exact_match": ("exact match of the whole answer (%)", ".1f"),
    "final_answer_match": ("exact match of the final answer alone (%)", ".1f"),
    "dev_loss": ("dev loss (mean response-token cross-entropy; lower is better)", ".3f"),
}


def metrics_of(result: dict[str, Any]) -> list[str]:
    """The :data:`METRICS` that the result's runs record (the final answer: the faithful family)."""
    return [m for m in METRICS if result["runs"] and all(m in run for run in result["runs"])] or [
        "exact_match"
    ]


def cells(
    result: dict[str, Any], metric: str = "exact_match"
) -> dict[tuple[str, str, str], dict[str, list[float]]]:
    """``(rule, k, method)`` → composite → the ``metric``'s scores over seeds (table rows, in order)."""
    out: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    rows = [*result["rules"], RANDOM_WEIGHTS]
    for rule in rows:
        for k in result["ks"]:
            for method in result["methods"]:
                out[(rule, k, method)] = {c: [] for c in result["composites"]}
    out[(FRESH, "—", FRESH)] = {c: [] for c in result["composites"]}
    for run in result["runs"]:
        key = (run["rule"], "—" if run["k"] is None else str(run["k"]), run["method"])
        out.setdefault(key, {c: [] for c in result["composites"]})[run["composite"]].append(run[metric])
    return out


def _cell(values: list[float], fmt: str = ".1f") -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def format_recycle_study(result: dict[str, Any]) -> str:
    """Markdown tables, one per recorded metric (:func:`metrics_of`): mean ± std over seeds per
    rule × k × method, and the two controls."""
    composites = result["composites"]
    kinds = ", ".join(f"{n} {kind}" for kind, n in result["pool"]["kinds"].items())
    lines = [
        f"Recycling study: pool of {len(result['pool']['loras'])} LoRAs ({kinds}); "
        f"mean ± std over seeds {result['seeds']}.",
        *(
            []
            if result.get("complete", True)
            else ["", f"**Under way**: {len(result['runs'])} runs so far; a cell without runs shows —."]
        ),
    ]
    for metric in metrics_of(result):
        label, fmt = METRICS[metric]
        lines += [
            "",
            f"{label[0].upper()}{label[1:]}:",
            "",
            "| selection | k | method | " + " | ".join(composites) + " | mean |",
            "| --- | --- | --- | " + " | ".join("---:" for _ in composites) + " | ---: |",
        ]
        for (rule, k, method), scores in cells(result, metric).items():
            every = [v for c in composites for v in scores[c]]
            mean = f"{statistics.mean(every):{fmt}}" if every else "—"
            name = METHOD_LABELS.get(method, method)
            row = " | ".join(_cell(scores[c], fmt) for c in composites)
            lines.append(f"| {rule} | {k} | {name} | {row} | {mean} |")
    return "\n".join(lines)


def format_by_k(result: dict[str, Any], metric: str = "exact_match") -> str:
    """A compact Markdown table of one score: a row per selection rule × method, a column per k,
    each cell the mean over composites and seeds (the number of runs beside it while the study
    is under way); the fresh LoRA last."""
    label, fmt = METRICS[metric]
    table = cells(result, metric)
    complete = result.get("complete", True)
    lines = [
        f"| selection | method | {' | '.join(f'k = {k}' for k in result['ks'])} |",
        "| --- | --- | " + " | ".join("---:" for _ in result["ks"]) + " |",
    ]

    def mean(values: list[float]) -> str:
        if not values:
            return "—"
        text = f"{statistics.mean(values):{fmt}}"
        return text if complete else f"{text} ({len(values)})"

    for rule in [*result["rules"], RANDOM_WEIGHTS]:
        for method in result["methods"]:
            row = [mean([v for vs in table[(rule, k, method)].values() for v in vs]) for k in result["ks"]]
            lines.append(f"| {rule} | {METHOD_LABELS.get(method, method)} | " + " | ".join(row) + " |")
    fresh = [v for vs in table[(FRESH, "—", FRESH)].values() for v in vs]
    lines.append(f"| {FRESH} | — | " + " | ".join(mean(fresh) for _ in result["ks"]) + " |")
    return f"{label[0].upper()}{label[1:]}, mean over composites and seeds:\n\n" + "\n".join(lines)


def plot_recycle(result: dict[str, Any], path: Path) -> Path:
    """Score against k, one panel per method and recorded metric (rows), one line per selection
    rule; the random-weights control dotted, the fresh LoRA dashed."""
    from lorafuse._extras import require

    matplotlib = require("matplotlib", "study", "the recycling study's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = result["ks"]
    metrics = metrics_of(result)
    fig, axes = plt.subplots(
        len(metrics),
        len(result["methods"]),
        figsize=(4.2 * len(result["methods"]), 3.4 * len(metrics)),
        squeeze=False,
        sharey="row",  # one scale per score: the methods side by side
    )
    for row, metric in enumerate(metrics):
        table = cells(result, metric)
        fresh = [v for vs in table[(FRESH, "—", FRESH)].values() for v in vs]
        for ax, method in zip(axes[row], result["methods"], strict=True):
            for rule in [*result["rules"], RANDOM_WEIGHTS]:
                means = []
                for k in ks:
                    values = [v for vs in table[(rule, k, method)].values() for v in vs]
                    means.append(statistics.mean(values) if values else float("nan"))
                style = ":" if rule == RANDOM_WEIGHTS else "-"
                ax.plot(range(len(ks)), means, style, marker="o", label=rule)
            if fresh:
                ax.axhline(statistics.mean(fresh), color="k", linestyle="--", label=FRESH)
            ax.set_xticks(range(len(ks)), ks)
            ax.set_xlabel("k (LoRAs chosen)")
            ax.set_title(METHOD_LABELS.get(method, method), fontsize=10)
        axes[row][0].set_ylabel(METRICS[metric][0].split(" (mean")[0], fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "ALL_COMPOSITES",
    "KINDS",
    "METHODS",
    "METRICS",
    "RecycleSettings",
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
