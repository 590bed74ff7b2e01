"""Write the skill world's data files, deterministically from a seed.

Layout under ``<world>/data/``: one folder per task with ``train.jsonl``, ``dev.jsonl`` and
``test.jsonl`` (``{"prompt", "completion", "answer"}`` per line, keys sorted), composite tasks
also ``oracle_train.jsonl``; and ``pretrain.txt``, the generic corpus of the base model
(building blocks only: stories, arithmetic facts, list operations, monolingual foreign text; never
a task's question/answer format, never a translation pair).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorafuse.skillworld import faithful, tasks
from lorafuse.skillworld.language import Language, make_language

LANGUAGE_SPECS = {"zorb": ("ktpmn", "aou", "reverse"), "vell": ("vlrsz", "eiy", "rotate")}


@dataclass(frozen=True)
class DataSizes:
    skill_train: int
    skill_dev: int
    skill_test: int
    composite_test: int
    oracle_train: int
    pretrain_lines: int
    composite_train: int = 200
    composite_dev: int = 100


def languages(seed: int) -> dict[str, Language]:
    taken: set[str] = set()
    return {
        name: make_language(
            name, [*tasks.ENGLISH_WORDS, *faithful.WORDS], consonants, vowels, order, seed, taken
        )
        for name, (consonants, vowels, order) in LANGUAGE_SPECS.items()
    }


def task_generators(langs: dict[str, Language]) -> dict[str, Callable[[random.Random], tasks.Example]]:
    """Every task of the world: skills, composites (``<skill>_<language>``) and the pool."""
    gens: dict[str, Callable[[random.Random], tasks.Example]] = {}
    for skill, make in tasks.TASK_SKILLS.items():
        gens[skill] = lambda rng, make=make: tasks.skill_example(make(rng))
    for name, lang in langs.items():
        gens[f"lang_{name}"] = lambda rng, lang=lang: tasks.translation_example(rng, lang)
    for skill, make in tasks.TASK_SKILLS.items():
        for name, lang in langs.items():
            gens[f"{skill}_{name}"] = lambda rng, make=make, lang=lang: tasks.composite_example(
                make(rng), lang
            )
    for name, lang in langs.items():
        gens[f"chat_{name}"] = lambda rng, lang=lang: faithful.chat_example(rng, lang)
    for task in faithful.WORDED:
        gens[task] = lambda rng, task=task: faithful.worded_example(task, rng)
        for name, lang in langs.items():
            gens[f"{task}_{name}"] = lambda rng, task=task, lang=lang: faithful.worded_example(
                task, rng, lang
            )
    gens.update(
        {
            "copy": tasks.pool_copy,
            "reverse": tasks.pool_reverse,
            "count": tasks.pool_count,
            "add": tasks.pool_add,
            "max": tasks.pool_max,
            "say_zorb": lambda rng: tasks.pool_say(rng, langs["zorb"]),
        }
    )
    return gens


SKILLS = ["math", "list", "lang_zorb", "lang_vell"]
COMPOSITES = ["math_zorb", "math_vell", "list_zorb", "list_vell"]
POOL = ["copy", "reverse", "count", "add", "max", "say_zorb"]
# The faithful family (lorafuse.skillworld.faithful): monolingual language skills, worded tasks.
FAITHFUL_SKILLS = ["math_worded", "list_worded", "chat_zorb", "chat_vell"]
FAITHFUL_COMPOSITES = ["math_worded_zorb", "math_worded_vell", "list_worded_zorb", "list_worded_vell"]
ALL_SKILLS = [*SKILLS, *FAITHFUL_SKILLS]
ALL_COMPOSITES = [*COMPOSITES, *FAITHFUL_COMPOSITES]


def composite_loras(composite: str) -> tuple[str, str]:
    """``(language LoRA, task LoRA)`` of a composite, in LoRA-Flow's order.

    ``math_zorb`` → ``(lang_zorb, math)`` (the ``translate`` variant); ``math_worded_zorb`` →
    ``(chat_zorb, math_worded)`` (the ``faithful`` variant).
    """
    task, _, language = composite.rpartition("_")
    if composite in FAITHFUL_COMPOSITES:
        return f"chat_{language}", task
    if composite in COMPOSITES:
        return f"lang_{language}", task
    raise KeyError(f"unknown composite task {composite!r}; choose one of {ALL_COMPOSITES}")


VARIANTS = {"faithful": FAITHFUL_COMPOSITES, "translate": COMPOSITES}


def _unique(
    gen: Callable[[random.Random], tasks.Example], rng: random.Random, n: int, seen: set[str]
) -> list[tasks.Example]:
    """``n`` examples whose prompts are not in ``seen`` (added to it); gives up after many repeats."""
    out: list[tasks.Example] = []
    tries = 0
    while len(out) < n and tries < 50 * n + 1000:
        tries += 1
        example = gen(rng)
        if example["prompt"] not in seen:
            seen.add(example["prompt"])
            out.append(example)
    if len(out) < n:
        raise RuntimeError(f"could only draw {len(out)} distinct examples of {n}")
    return out


def _write_jsonl(path: Path, rows: list[tasks.Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[tasks.Example]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pretrain_corpus(rng: random.Random, langs: dict[str, Language], lines: int) -> list[str]:
    """Generic text made of the world's building blocks, never a task's question/answer format.

    Stories, arithmetic facts, list operations and item look-ups, copies of word sequences,
    monolingual foreign sentences, and bilingual dictionary entries (``zorb tiko means apples .``)
    for every foreign word and number word.
    """
    entries = [
        f"{name} {foreign} means {tasks.split_digits(english)} ."
        for name, lang in sorted(langs.items())
        for english, foreign in [*lang.lexicon.items(), *((str(n), w) for n, w in lang.numbers.items())]
    ]
    out = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.15:
            out.append(tasks.split_digits(tasks.math_problem(rng).text))
        elif kind < 0.30:
            a, b = rng.randint(0, 19), rng.randint(0, 9)
            fact = f"{a} + {b} = {a + b} ." if rng.random() < 0.5 or a < b else f"{a} - {b} = {a - b} ."
            out.append(tasks.split_digits(fact))
        elif kind < 0.40:
            items = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
            op = rng.choice(["sort", "reverse"])
            result = sorted(items) if op == "sort" else items[::-1]
            out.append(f"{op} {' '.join(map(str, items))} gives {' '.join(map(str, result))} .")
        elif kind < 0.48:
            items = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
            which, index = rng.choice([("first", 0), ("second", 1), ("last", -1)])
            out.append(f"the {which} item of {' '.join(map(str, items))} is {items[index]} .")
        elif kind < 0.53:
            out.append(tasks.list_problem(rng).text)
        elif kind < 0.60:
            words = " ".join(
                rng.choice(tasks.FILLER + tasks.NAMES + tasks.ITEMS) for _ in range(rng.randint(2, 6))
            )
            out.append(f"{words} . {words} .")
        elif kind < 0.75:
            out.append(rng.choice(entries))
        else:  # monolingual foreign text: numbers as number words or as digits (shared)
            lang = rng.choice(sorted(langs))
            pick = rng.random()
            if pick < 0.35:
                text = tasks.math_problem(rng).text
            elif pick < 0.55:
                text = tasks.list_problem(rng).text
            else:
                text = faithful.english_chat_text(rng)
            numerals = rng.random() < 0.5
            out.append(tasks.split_digits(langs[lang].translate(text, numerals=numerals)))
    return out


def write_world_data(root: Path, seed: int, sizes: DataSizes) -> list[Path]:
    """Write every data file under ``root/data``; returns the paths written."""
    langs = languages(seed)
    gens = task_generators(langs)
    data = root / "data"
    written: list[Path] = []
    for task in [*ALL_SKILLS, *ALL_COMPOSITES, *POOL]:
        rng = random.Random(f"{seed}-{task}")
        seen: set[str] = set()
        composite = task in ALL_COMPOSITES
        test = _unique(gens[task], rng, sizes.composite_test if composite else sizes.skill_test, seen)
        dev = _unique(gens[task], rng, sizes.composite_dev if composite else sizes.skill_dev, seen)
        train = _unique(gens[task], rng, sizes.composite_train if composite else sizes.skill_train, seen)
        splits = {"train": train, "dev": dev, "test": test}
        if composite:
            splits["oracle_train"] = _unique(gens[task], rng, sizes.oracle_train, seen)
        for split, rows in splits.items():
            path = data / task / f"{split}.jsonl"
            _write_jsonl(path, rows)
            written.append(path)
    corpus = pretrain_corpus(random.Random(f"{seed}-pretrain"), langs, sizes.pretrain_lines)
    (data / "pretrain.txt").write_text("\n".join(corpus) + "\n")
    written.append(data / "pretrain.txt")
    lexicon = {
        n: {"order": lang.order, "lexicon": lang.lexicon, "numbers": lang.numbers}
        for n, lang in langs.items()
    }
    (data / "languages.json").write_text(json.dumps(lexicon, sort_keys=True, indent=1) + "\n")
    written.append(data / "languages.json")
    return written
