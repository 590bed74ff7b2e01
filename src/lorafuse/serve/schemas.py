"""Request bodies of the OpenAI-compatible routes, validated at the door (pydantic, frozen).

Fields the server does not implement are refused when set to a non-default value (penalties,
``best_of``, ``suffix``), never silently ignored. ``logprobs`` (completions: 0–20 top tokens;
chat: ``logprobs`` + ``top_logprobs``), ``echo``, ``n`` and token-id prompts are served.
Unknown fields are ignored, as the OpenAI API does. ``compose`` is lorafuse's extension:
``{adapter: weight}`` or a fusion's name.
Numbers are strict: integers are integers (``4.5`` and ``true`` are refused), floats are finite,
``seed`` fits 64 bits unsigned (``0 … 2**64-1``, what torch's generator takes).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from lorafuse._checks import NonNegativeInt, PositiveInt
from lorafuse.serve.logprobs import MAX_TOP_LOGPROBS

MAX_SEED = 2**64 - 1
# OpenAI takes 4 stop strings; lm-eval appends the tokenizer's eos text to a task's `until`
# (HumanEval's has 5 entries), and vLLM sets no limit.
MAX_STOP = 16
TopLogprobs = Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)]
PROMPT_KINDS = "a string, a list of strings, a list of token ids or a list of lists of token ids"


def _token_ids(ids: list[Any], where: str) -> list[int]:
    if not ids:
        raise ValueError(f"{where}is an empty list of token ids")
    for i, t in enumerate(ids):
        if type(t) is not int:
            raise ValueError(f"{where}item {i} is not a token id (an integer)")
        if t < 0:
            raise ValueError(f"{where}item {i} is a negative token id ({t})")
    return ids


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str = Field(min_length=1)
    max_tokens: NonNegativeInt | None = None  # 0 only for completions with echo
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: PositiveInt = 1
    stream: StrictBool = False
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED)
    min_tokens: NonNegativeInt = 0  # vLLM's extension: no end-of-sequence before this many
    compose: dict[str, Any] | str | None = None
    presence_penalty: float = Field(default=0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, allow_inf_nan=False)

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"`stop` takes at most {MAX_STOP} non-empty strings")
        return stop

    @model_validator(mode="after")
    def _unsupported(self) -> _Common:
        if self.stream and self.n > 1:
            raise ValueError("`n` > 1 is not supported with `stream`")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence and frequency penalties are not supported")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Common):
    prompt: Any  # one of PROMPT_KINDS, checked below
    echo: StrictBool = False
    logprobs: TopLogprobs | None = None
    best_of: StrictInt | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, str):
            return prompt
        if not isinstance(prompt, list):
            raise ValueError(f"must be {PROMPT_KINDS}")
        if not prompt:
            raise ValueError("is an empty list")
        if all(isinstance(p, str) for p in prompt):
            return prompt
        if all(isinstance(p, list) for p in prompt):
            for i, p in enumerate(prompt):
                _token_ids(p, f"prompt {i} ")
            return prompt
        if any(isinstance(p, (str, list)) for p in prompt):
            raise ValueError(f"mixes kinds; it must be {PROMPT_KINDS}")
        return _token_ids(prompt, "")

    @model_validator(mode="after")
    def _prompts(self) -> CompletionRequest:
        if self.stream and len(self.prompts) > 1:
            raise ValueError("streaming takes one prompt per request")
        if self.stream and (self.echo or self.logprobs is not None):
            raise ValueError("`echo` and `logprobs` are not supported with `stream`")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 needs `echo` (the prompt's log-probabilities); otherwise ≥ 1")
        if (self.best_of not in (None, 1)) or self.suffix:
            raise ValueError("`best_of` and `suffix` are not supported")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        if isinstance(self.prompt, str) or type(self.prompt[0]) is int:
            return [self.prompt]
        return list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool = False
    top_logprobs: TopLogprobs | None = None

    @model_validator(mode="after")
    def _chat(self) -> ChatRequest:
        if self.max_tokens == 0:
            raise ValueError("max_tokens: must be ≥ 1 for chat")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs `logprobs: true`")
        if self.stream and self.logprobs:
            raise ValueError("`logprobs` is not supported with `stream`")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: the prompt's token ids, as a completion would encode it (``<s>`` first
    when the tokenizer has one; ``add_special_tokens: false`` leaves it out)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    model: str | None = None
    prompt: str
    add_special_tokens: StrictBool = True


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``: the text of token ids."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    model: str | None = None
    tokens: list[StrictInt]

    @field_validator("tokens")
    @classmethod
    def _ids(cls, tokens: list[int]) -> list[int]:
        return _token_ids(tokens, "") if tokens else tokens
