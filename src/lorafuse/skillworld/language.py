"""Synthetic foreign languages: a seeded lexicon, number words and a word order of their own.

A language maps every English word of the world's domain to a pseudo-word built from its own
syllable inventory, every number 0–19 to a number word, and reorders each sentence:
``reverse`` (the words of a sentence in reverse order, as in a verb-final language) or
``rotate`` (the first word moved to the end). Final punctuation stays last. With
``numerals=True`` numbers stay as digits (shared between languages, as Arabic numerals are in
MGSM) and a run of numbers (a list) moves as one unit: the faithful family's texts are written
that way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

PUNCTUATION = {".", "?"}
MAX_NUMBER = 19  # number words exist for 0..MAX_NUMBER


@dataclass(frozen=True)
class Language:
    name: str
    lexicon: dict[str, str]  # English word → foreign word
    numbers: dict[int, str]  # number → foreign number word
    order: str  # "reverse" | "rotate"
    inverse: dict[str, str] = field(default_factory=dict)

    def translate_sentence(self, words: list[str], *, numerals: bool = False) -> list[str]:
        """One English sentence (tokens, numbers as int-strings ``"12"``) → foreign tokens."""
        end = words[-1] if words and words[-1] in PUNCTUATION else None
        body = words[:-1] if end else list(words)
        if numerals:  # a run of numbers (a list "4 1 7") is one unit of the word order
            out: list[str] = []
            for w in body:
                if w.isdigit() and out and out[-1].replace(" ", "").isdigit():
                    out[-1] += f" {w}"
                else:
                    out.append(w if w.isdigit() else self.lexicon[w])
        else:
            out = [self.numbers[int(w)] if w.isdigit() else self.lexicon[w] for w in body]
        if self.order == "reverse":
            out.reverse()
        elif self.order == "rotate" and out:
            out = out[1:] + out[:1]
        return [*out, end] if end else out

    def translate(self, text: str, *, numerals: bool = False) -> str:
        """English text with whole numbers (``"ana has 12 coins ."``) → foreign text."""
        out: list[str] = []
        sentence: list[str] = []
        for word in text.split():
            sentence.append(word)
            if word in PUNCTUATION:
                out += self.translate_sentence(sentence, numerals=numerals)
                sentence = []
        if sentence:
            out += self.translate_sentence(sentence, numerals=numerals)
        return " ".join(out)


def _pseudo_words(rng: random.Random, consonants: str, vowels: str, count: int, taken: set[str]) -> list[str]:
    words: list[str] = []
    while len(words) < count:
        syllables = rng.choice([2, 2, 3])
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def make_language(
    name: str, english_words: list[str], consonants: str, vowels: str, order: str, seed: int, taken: set[str]
) -> Language:
    """A seeded language over ``english_words`` (sorted, so the lexicon does not depend on order)."""
    rng = random.Random(f"{seed}-{name}")
    words = sorted(set(english_words))
    foreign = _pseudo_words(rng, consonants, vowels, len(words) + MAX_NUMBER + 1, taken)
    lexicon = dict(zip(words, foreign[: len(words)], strict=True))
    numbers = dict(enumerate(foreign[len(words) :]))
    inverse = {v: k for k, v in lexicon.items()} | {v: str(k) for k, v in numbers.items()}
    return Language(name, lexicon, numbers, order, inverse)
