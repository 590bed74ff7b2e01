"""The world's word-level tokenizer, saved as a HuggingFace tokenizer (``AutoTokenizer`` loads it).

Texts are space-separated tokens with digits already split, so the tokenizer is a plain
vocabulary lookup (``WordLevel`` after a whitespace split); decoding joins tokens with spaces,
the same in lorafuse, ``tokenizer.decode`` and every engine that runs the HF tokenizer (vLLM).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A tokenizer over every token of ``texts`` (sorted, after the four special tokens)."""
    words = sorted({w for text in texts for w in text.split()} - set(SPECIALS))
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordPiece's decoder glues a token that starts with its prefix to the one before and joins
    # the others with spaces. No token of a whitespace split starts with a space, so with " " as
    # the prefix it is a plain space join ("##" would glue "####" to the previous token: ".##").
    core.decoder = decoders.WordPiece(prefix=" ", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=256,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    tokenizer.save_pretrained(str(path))
