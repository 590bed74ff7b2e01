"""Request bodies of the OpenAI-compatible routes, validated at the door (pydantic, frozen).

Fields the server does not implement are refused when set to a non-default value (``n > 1``,
``logprobs``, penalties, ``best_of``), never silently ignored. Unknown fields are ignored, as the
OpenAI API does. ``compose`` is lorafuse's extension: ``{adapter: weight}`` or a fusion's name.
Numbers are strict: integers are integers (``4.5`` and ``true`` are refused), floats are finite,
``seed`` fits 64 bits unsigned (``0 … 2**64-1``, what torch's generator takes).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from lorafuse._checks import NonNegativeInt, PositiveInt

MAX_SEED = 2**64 - 1


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str = Field(min_length=1)
    max_tokens: PositiveInt | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: StrictInt = 1
    stream: StrictBool = False
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED)
    min_tokens: NonNegativeInt = 0  # vLLM's extension: no end-of-sequence before this many
    compose: dict[str, Any] | str | None = None
    logprobs: Any = None
    presence_penalty: float = Field(default=0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, allow_inf_nan=False)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported; send separate requests for more samples")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("`stop` takes at most 4 non-empty strings")
        return stop

    @model_validator(mode="after")
    def _unsupported(self) -> _Common:
        if self.logprobs not in (None, False, 0):
            raise ValueError("`logprobs` is not supported")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence and frequency penalties are not supported")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _prompts(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("`prompt` is an empty list")
        if self.stream and isinstance(self.prompt, list) and len(self.prompt) > 1:
            raise ValueError("streaming takes one prompt per request")
        if self.echo or (self.best_of not in (None, 1)) or self.suffix:
            raise ValueError("`echo`, `best_of` and `suffix` are not supported")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


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

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
