"""The faithful composite family: LoRA-Flow's own setting (arXiv 2402.11455) in the skill world.

In LoRA-Flow the language LoRA is trained on general chat **in** the language, the math LoRA on
English math, and a composite (MGSM zh/ru/es) is posed **and answered** in the language with the
digits and equations shared: one answer interleaves language tokens and computation tokens. Here:

- **language skills** ``chat_<language>`` (monolingual, never a translation pair, never
  arithmetic): a short story of facts and a question about it, posed in the language and
  answered in it with one full sentence restating a fact
  (``question : <story> <question> answer : <the fact sentence>``, all in the language);
- **task skills** ``math_worded`` / ``list_worded`` (English): worked answers that restate each
  step in words before its computation (``ana finds 2 apples : 3 + 2 = 5 . ... ana has 4 apples
  . #### 4``; ``sort the list : 1 3 4 . the first item is 1 . #### 1``);
- **composites** ``<task>_<language>`` (``math_worded_zorb``...): the task posed in the language
  and answered in it: every restatement in the language, the equations and lists as in English
  (numbers are digits in every language).

The ``answer`` of every row of the family is its whole completion: an answer is right when the
restatements are in the language and every step and the result are right
(:func:`lorafuse.eval.metrics.exact_match` matches an answer holding ``####`` whole). The final
number alone, MGSM's metric, is reported beside it (``final_answer``).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from lorafuse.skillworld import tasks
from lorafuse.skillworld.language import Language

Segment = tuple[str, str]  # ("words", English text to say in the language) | ("math", kept as is)

WORDS = ["happened"]  # the family's words beyond tasks.ENGLISH_WORDS


def _say(segments: list[Segment], language: Language | None) -> str:
    """Join segments; ``words`` segments are said in ``language`` (English if None), digits shared."""
    out = []
    for kind, text in segments:
        if kind == "words" and language is not None:
            text = language.translate(text, numerals=True)
        out.append(text)
    return tasks.split_digits(" ".join(out))


def _worded_math(rng: random.Random) -> tuple[str, list[Segment], str]:
    """A two-step problem (as :func:`tasks.math_problem`) with each step restated before its equation."""
    name, item = rng.choice(tasks.NAMES), rng.choice(tasks.ITEMS)
    value = rng.randint(1, 9)
    sentences = [f"{name} has {value} {item} ."]
    answer: list[Segment] = []
    for _ in range(2):
        gain = value == 0 or (rng.random() < 0.5 and value + 1 <= 19)
        if gain:
            amount = rng.randint(1, min(9, 19 - value))
            step, new = f"{name} {rng.choice(tasks.GAINS)} {amount} {item}", value + amount
            equation = f"{value} + {amount} = {new} ."
        else:
            amount = rng.randint(1, min(9, value))
            step, new = f"{name} {rng.choice(tasks.LOSSES)} {amount} {item}", value - amount
            equation = f"{value} - {amount} = {new} ."
        sentences.append(f"{step} .")
        answer += [("words", step), ("math", f": {equation}")]
        value = new
    sentences.append(f"how many {item} does {name} have ?")
    answer += [("words", f"{name} has {value} {item} ."), ("math", f"#### {value}")]
    return " ".join(sentences), answer, str(value)


def _worded_list(rng: random.Random) -> tuple[str, list[Segment], str]:
    """A list program (as :func:`tasks.list_problem`) with the operation and the pick said in words."""
    items = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    op, query = rng.choice(sorted(tasks.LIST_OPS)), rng.choice(sorted(tasks.LIST_QUERIES))
    result = sorted(items) if op == "sort" else items[::-1]
    picked = {"first": result[0], "last": result[-1], "second": result[1]}[query]
    text = f"the list is {' '.join(map(str, items))} . {tasks.LIST_OPS[op]} . {tasks.LIST_QUERIES[query]} ?"
    answer: list[Segment] = [
        ("words", tasks.LIST_OPS[op]),
        ("math", f": {' '.join(map(str, result))} ."),
        ("words", f"the {query} item is {picked} ."),
        ("math", f"#### {picked}"),
    ]
    return text, answer, str(picked)


WORDED: dict[str, Callable[[random.Random], tuple[str, list[Segment], str]]] = {
    "math_worded": _worded_math,
    "list_worded": _worded_list,
}


def worded_example(task: str, rng: random.Random, language: Language | None = None) -> tasks.Example:
    """A ``math_worded`` / ``list_worded`` row, in English or (a composite) posed and answered in
    ``language``; ``answer`` is the whole completion, ``final_answer`` the result."""
    text, segments, result = WORDED[task](rng)
    prompt = language.translate(text, numerals=True) if language is not None else text
    completion = _say(segments, language)
    return {
        "prompt": f"question : {tasks.split_digits(prompt)} answer :",
        "completion": completion,
        "answer": completion,
        "final_answer": tasks.split_digits(result),
    }


def _fact(rng: random.Random, name: str) -> str:
    """``name`` has / finds / loses ... some items (one sentence)."""
    item, amount = rng.choice(tasks.ITEMS), rng.randint(1, 19)
    verb = rng.choice(["has", "has", *tasks.GAINS, *tasks.LOSSES])
    return f"{name} {verb} {amount} {item} ."


def chat_example(rng: random.Random, language: Language) -> tasks.Example:
    """A question about a short story, posed and answered in ``language``: the story retold
    (``what happened ?``: each fact restated, in order) or the list restated (``what is the list ?``).

    The retelling is the language half of a composite's answer, where each step of the problem is
    restated in the language. (A first design asked about one fact, ``who has <item> ?``; the
    default world's base did not learn to find the fact: 16 % after 1,800 steps, see
    docs/faithful-world.md.)
    """
    if rng.random() < 0.2:  # the list domain: restate the list
        items = " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5)))
        other = " ".join(rng.choice(tasks.FILLER) for _ in range(rng.randint(2, 4)))
        story = [f"{other} .", f"the list is {items} ."]
        rng.shuffle(story)
        question, answer = "what is the list ?", f"the list is {items} ."
    else:
        names = rng.sample(tasks.NAMES, rng.randint(2, 3))
        story = [_fact(rng, n) for n in names]
        question, answer = "what happened ?", " ".join(story)
    text = language.translate(" ".join([*story, question]), numerals=True)
    target = tasks.split_digits(language.translate(answer, numerals=True))
    return {
        "prompt": f"question : {tasks.split_digits(text)} answer :",
        "completion": target,
        "answer": target,
    }


def english_chat_text(rng: random.Random) -> str:
    """A story of the chat skill in English, whole numbers (pretraining text, no question)."""
    names = rng.sample(tasks.NAMES, rng.randint(2, 3))
    return " ".join(_fact(rng, n) for n in names)
