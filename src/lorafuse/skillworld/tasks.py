"""The skill world's tasks: seeded generators of ``{"prompt", "completion", "answer"}`` examples.

Texts are space-separated tokens; numbers are written digit by digit (``12`` → ``1 2``), so a
word-level tokenizer with ten digit tokens covers every number (DESIGN.md: word-level with split
digits learns several times faster than characters). Task skills are posed in English; the
language skills translate a foreign language into English; composite tasks pose a task skill in
a foreign language and expect the English worked answer, so they need both skills at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from lorafuse.skillworld.language import Language

NAMES = ["ana", "bob", "cara", "dan", "eve", "finn", "gus", "hana"]
ITEMS = ["apples", "coins", "books", "stones", "cards", "eggs", "pens", "shells"]
GAINS = ["finds", "gets", "buys", "wins"]
LOSSES = ["loses", "gives", "sells", "drops"]
LIST_OPS = {"sort": "sort the list", "reverse": "reverse the list"}
LIST_QUERIES = {
    "first": "what is the first item",
    "last": "what is the last item",
    "second": "what is the second item",
}
FILLER = ["red", "blue", "green", "big", "small", "old", "new", "cat", "dog", "tree", "house", "river"]
ENGLISH_WORDS = sorted(
    {*NAMES, *ITEMS, *GAINS, *LOSSES, *FILLER}
    | {"has", "how", "many", "does", "have", "the", "list", "is", "sort", "reverse", "what", "first"}
    | {"last", "second", "item"}
)

Example = dict[str, str]


def split_digits(text: str) -> str:
    """``"ana has 12 coins"`` → ``"ana has 1 2 coins"``."""
    return " ".join(" ".join(tok) if tok.isdigit() else tok for tok in text.split())


@dataclass(frozen=True)
class Problem:
    """An English problem with whole numbers, its worked completion and its answer."""

    text: str
    completion: str
    answer: str


def math_problem(rng: random.Random) -> Problem:
    """Two-step arithmetic word problem: ``3 + 4 = 7 . 7 - 2 = 5 . #### 5``; values stay in 0–19."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(1, 9)
    sentences = [f"{name} has {value} {item} ."]
    steps = []
    for _ in range(2):
        if rng.random() < 0.5 and value + 1 <= 19:
            amount = rng.randint(1, min(9, 19 - value))
            sentences.append(f"{name} {rng.choice(GAINS)} {amount} {item} .")
            steps.append(f"{value} + {amount} = {value + amount} .")
            value += amount
        elif value >= 1:
            amount = rng.randint(1, min(9, value))
            sentences.append(f"{name} {rng.choice(LOSSES)} {amount} {item} .")
            steps.append(f"{value} - {amount} = {value - amount} .")
            value -= amount
        else:
            amount = rng.randint(1, 9)
            sentences.append(f"{name} {rng.choice(GAINS)} {amount} {item} .")
            steps.append(f"{value} + {amount} = {value + amount} .")
            value += amount
    sentences.append(f"how many {item} does {name} have ?")
    return Problem(" ".join(sentences), " ".join([*steps, f"#### {value}"]), str(value))


def list_problem(rng: random.Random) -> Problem:
    """A two-step list program: ``sort``/``reverse``, then pick an item: ``1 4 7 . #### 1``."""
    items = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    op, query = rng.choice(sorted(LIST_OPS)), rng.choice(sorted(LIST_QUERIES))
    result = sorted(items) if op == "sort" else items[::-1]
    picked = {"first": result[0], "last": result[-1], "second": result[1]}[query]
    text = f"the list is {' '.join(map(str, items))} . {LIST_OPS[op]} . {LIST_QUERIES[query]} ?"
    return Problem(text, f"{' '.join(map(str, result))} . #### {picked}", str(picked))


TASK_SKILLS: dict[str, Callable[[random.Random], Problem]] = {"math": math_problem, "list": list_problem}


def skill_example(problem: Problem) -> Example:
    return {
        "prompt": f"question : {split_digits(problem.text)} answer :",
        "completion": split_digits(problem.completion),
        "answer": split_digits(problem.answer),
    }


def composite_example(problem: Problem, language: Language) -> Example:
    return {
        "prompt": f"question : {language.translate(problem.text)} answer :",
        "completion": split_digits(problem.completion),
        "answer": split_digits(problem.answer),
    }


def translation_example(rng: random.Random, language: Language) -> Example:
    """Foreign → English, on the sentences the world's problems are made of (1–2 sentences)."""
    problem = rng.choice(list(TASK_SKILLS.values()))(rng)
    sentences = [s.strip() + " " + p for s, p in _sentences(problem.text)]
    start = rng.randrange(len(sentences))
    english = " ".join(sentences[start : start + rng.randint(1, 2)])
    target = split_digits(english)
    return {
        "prompt": f"translate : {language.translate(english)} english :",
        "completion": target,
        "answer": target,
    }


def _sentences(text: str) -> list[tuple[str, str]]:
    out, current = [], []
    for word in text.split():
        if word in {".", "?"}:
            out.append((" ".join(current), word))
            current = []
        else:
            current.append(word)
    return out


def _words(rng: random.Random, low: int = 3, high: int = 6) -> list[str]:
    return [rng.choice(FILLER + NAMES + ITEMS) for _ in range(rng.randint(low, high))]


def _digits(rng: random.Random) -> list[int]:
    return [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]


def pool_copy(rng: random.Random) -> Example:
    words = " ".join(_words(rng))
    return {"prompt": f"copy : {words} .", "completion": f"{words} .", "answer": f"{words} ."}


def pool_reverse(rng: random.Random) -> Example:
    words = _words(rng)
    out = " ".join(reversed(words))
    return {"prompt": f"reverse : {' '.join(words)} .", "completion": f"{out} .", "answer": f"{out} ."}


def pool_count(rng: random.Random) -> Example:
    words = _words(rng, 1, 9)
    return {
        "prompt": f"count : {' '.join(words)} .",
        "completion": f"#### {len(words)}",
        "answer": str(len(words)),
    }


def pool_add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    total = split_digits(str(a + b))
    prompt = split_digits(f"add : {a} and {b} .")
    return {"prompt": prompt, "completion": f"#### {total}", "answer": total}


def pool_max(rng: random.Random) -> Example:
    digits = _digits(rng)
    return {
        "prompt": f"max : {' '.join(map(str, digits))} .",
        "completion": f"#### {max(digits)}",
        "answer": str(max(digits)),
    }


def pool_say(rng: random.Random, language: Language) -> Example:
    """English → foreign (the reverse direction of the language skill)."""
    problem = rng.choice(list(TASK_SKILLS.values()))(rng)
    sentence, end = rng.choice(_sentences(problem.text))
    english = f"{sentence} {end}"
    foreign = language.translate(english)
    return {
        "prompt": f"say in {language.name} : {split_digits(english)}",
        "completion": foreign,
        "answer": foreign,
    }
