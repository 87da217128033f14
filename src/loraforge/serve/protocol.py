"""OpenAI's request bodies and response shapes for /v1/completions and /v1/chat/completions, as pydantic models.

Fields a client may send that the server does not do (log-probabilities, tools, penalties other than 0, best_of) are
refused with 400 naming the field, never silently ignored; unknown extra fields (`user`, ...) are accepted as
OpenAI accepts them.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loraforge.errors import LoraforgeError
from loraforge.infer.engine import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # not OpenAI's; vLLM's extension
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever comes (benchmarks)
    n: int = Field(default=1, ge=1, le=8)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise BadField(name, f"{name} is not supported by this server; leave it at 0")
        if self.logprobs not in (None, False):
            raise BadField("logprobs", "logprobs are not supported by this server; leave the field out")
        if self.logit_bias:
            raise BadField("logit_bias", "logit_bias is not supported by this server; leave the field out")
        if self.stream_options is not None and not self.stream:
            raise BadField("stream_options", "stream_options goes with stream: true")

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise BadField("stop", f"at most 4 stop strings, got {len(stop)}")
        return stop

    def params(self, max_tokens: int, choice: int) -> SamplingParams:
        """The engine's sampling settings for choice `choice` (its seed is seed + choice, so n > 1 differ)."""
        seed = None if self.seed is None else self.seed + choice
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                                  top_k=self.top_k, seed=seed, ignore_eos=self.ignore_eos)
        except LoraforgeError as e:
            raise BadField("temperature", str(e)) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionBody(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise BadField("echo", "echo is not supported by this server")
        if self.best_of not in (None, 1) and self.best_of != self.n:
            raise BadField("best_of", "best_of is not supported by this server; use n")
        if self.suffix:
            raise BadField("suffix", "suffix (insertion) is not supported by this server")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _ends_with_a_turn_to_answer(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role == "assistant":
            raise ValueError("the last message is the assistant's: end with a user turn for the model to answer")
        return messages

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise BadField("tools", "tool calling is not supported by this server")
        if self.response_format and self.response_format.get("type") != "text":
            raise BadField("response_format", "only response_format {\"type\": \"text\"} is supported")

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class BadField(LoraforgeError):
    """A request body field the server cannot honour: 400 naming the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
