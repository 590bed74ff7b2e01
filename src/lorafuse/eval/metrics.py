"""Exact match on the ``answer`` field.

When the reference completion ends with ``#### <answer>`` (worked problems) and the answer is
the result alone, the prediction is the text after the last ``####`` of the generation; an
answer that itself holds ``####`` (the faithful family: the whole worked answer, words and
steps, is the answer) is matched against the whole generation; otherwise the prediction is the
whole generation. Both sides are compared after collapsing whitespace.
"""

from __future__ import annotations

MARKER = "####"


def normalize(text: str) -> str:
    return " ".join(text.split())


def extract_answer(generated: str, reference_completion: str, answer: str = "") -> str:
    if MARKER in reference_completion and MARKER not in answer:
        if MARKER not in generated:
            return ""
        return normalize(generated.rsplit(MARKER, 1)[1])
    return normalize(generated)


def exact_match(generated: str, answer: str, reference_completion: str) -> bool:
    return extract_answer(generated, reference_completion, answer) == normalize(answer)
