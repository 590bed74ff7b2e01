"""Tiny seeded HuggingFace models and PEFT adapters, for tests, the demo and benchmarks.

Everything is built locally (nothing comes from a hub): a ``LlamaForCausalLM`` or
``GPT2LMHeadModel`` with hidden size 32 by default, and LoRA adapters made by PEFT itself with
random (non-zero) factors so that each one visibly changes the logits.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, PreTrainedModel

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_llama(
    seed: int = 0,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    vocab_size: int = 128,
) -> LlamaForCausalLM:
    """A randomly initialised Llama (grouped-query attention, SwiGLU MLP), in eval mode."""
    return _tiny_decoder(
        "llama", seed, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size
    )


def _tiny_decoder(
    kind: str,
    seed: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    vocab_size: int = 128,
) -> PreTrainedModel:
    """A Llama-shaped decoder of any HF ``model_type`` (``llama``, ``qwen2``, ``mistral``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        kind,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_gpt2(
    seed: int = 0, *, hidden_size: int = 32, num_layers: int = 2, vocab_size: int = 128
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 (``Conv1D`` layers named ``c_attn``, ``c_proj``, ``c_fc``)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=4,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_causal_lm(kind: str, seed: int = 0, *, vocab_size: int = 128) -> PreTrainedModel:
    """A tiny randomly initialised ``llama``, ``qwen2``, ``mistral`` or ``gpt2`` (hidden 32, 2 layers)."""
    if kind == "gpt2":
        return tiny_gpt2(seed, vocab_size=vocab_size)
    return _tiny_decoder(kind, seed, vocab_size=vocab_size)


def word_tokenizer(vocab_size: int = 128):  # type: ignore[no-untyped-def]
    """A word-level fast tokenizer ``<pad>=0, <s>=1, </s>=2, w3 … w{V-1}`` (whitespace-split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CHAT_CORPUS = (
    "the quick brown fox jumps over the lazy dog . ana has 3 apples and finds 4 more : 3 + 4 = 7 .",
    "hello ! how are you today ? i am fine , thank you . what is 12 times 3 ? it is 36 .",
    "you are a helpful assistant . answer briefly and show each step of the computation .",
)


def chat_tokenizer(vocab_size: int = 320):  # type: ignore[no-untyped-def]
    """A tiny byte-level BPE tokenizer with ChatML special tokens and chat template.

    Trained deterministically on a few sentences: ``<|endoftext|>`` (pad) = 0, ``<|im_start|>`` = 1,
    ``<|im_end|>`` (eos) = 2, no BOS (as Qwen's and SmolLM2's templates), merges that cross word
    and digit boundaries as real BPE vocabularies do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(_CHAT_CORPUS) * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def save_model(model: PreTrainedModel, path: str | os.PathLike[str]) -> Path:
    """Save a model as a HuggingFace folder (safetensors) and return the path."""
    model.save_pretrained(str(path))
    return Path(path)


def random_peft_adapter(
    model: PreTrainedModel,
    path: str | os.PathLike[str],
    *,
    seed: int,
    r: int = 4,
    lora_alpha: float = 8,
    target_modules: list[str] | str | None = None,
    **config: Any,
) -> Path:
    """Create a LoRA with PEFT on a copy of ``model``, randomise its factors, save it to ``path``.

    PEFT's default initialisation sets ``B = 0`` (no effect); here both factors are drawn from
    ``N(0, 0.1²)`` so the adapter changes the output. Extra keyword arguments go to
    ``LoraConfig`` (``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ``fan_in_fan_out``, ...).
    """
    if target_modules is None:
        target_modules = GPT2_TARGETS if isinstance(model, GPT2LMHeadModel) else LLAMA_TARGETS
    peft_config = LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=target_modules, lora_dropout=0.0, **config
    )
    peft_model = get_peft_model(copy.deepcopy(model), peft_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(str(path))
    return Path(path)
