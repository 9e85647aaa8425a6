"""OpenAI's completions and chat completions, as request and response models."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from service.api.schemas.common import (
    MODEL_DOC,
    SEED_MAX,
    RequestModel,
    StopStrings,
    Usage,
    check_cap,
    check_no_bias,
    check_stop,
    check_text,
    check_texts,
    check_total,
    default_within_cap,
    settings_of,
    stop_list,
)
from service.engine.sampling import SamplingParams
from service.engine.types import FinishReason, GenerationRequest

# --------------------------------------------------------------------------- OpenAI-compatible completions


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def unix_time() -> int:
    """OpenAI's `created`: whole seconds since the epoch."""
    return int(time.time())


OPENAI_DEFAULT_MAX_TOKENS = 16  # what OpenAI's completions API generates when max_tokens is null or absent


class StreamOptions(RequestModel):
    include_usage: bool = Field(False, description="send a last chunk with the usage and no choices")


class CompletionRequest(RequestModel):
    """The legacy OpenAI Completions request, with vLLM's `top_k`."""

    model: str = Field(min_length=1, max_length=128, description=MODEL_DOC.split("; absent")[0])
    prompt: str | list[str] = Field("", description="one prompt or a list; token-id prompts are not supported")
    max_tokens: int | None = Field(
        OPENAI_DEFAULT_MAX_TOKENS,
        ge=0,
        description="characters per choice; null or absent means 16, or MAX_TOKENS if lower; 0 is allowed with "
        "echo, to score the prompt",
    )
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="vLLM extension; -1, 0 or null turn it off")
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1, description="generate this many and return the n most likely")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5, description="alternatives per token, up to 5")
    echo: bool = False
    stop: StopStrings = Field(None, description="up to 4 stop strings; the stop text is not returned")
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = Field(None, max_length=256, description="end-user id; written to the access log")
    logit_bias: dict[str, float] | None = Field(None, description="accepted only empty: {} or null")
    suffix: None = Field(None, description="accepted only null: text after the completion is not supported")

    _stop = field_validator("stop")(check_stop)

    _bias = field_validator("logit_bias")(check_no_bias)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        if isinstance(value, str):
            return check_text(value, info)
        if not value:
            raise ValueError("give at least one prompt")
        return check_texts(value, info)

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        return check_cap(value, info, "max_tokens")

    @field_validator("n", "best_of")
    @classmethod
    def _n(cls, value: int | None, info: ValidationInfo) -> int | None:
        return check_cap(value, info, "max_n")

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None, info: ValidationInfo) -> int | None:
        return check_cap(value, info, "max_top_k")

    @model_validator(mode="after")
    def _combinations(self, info: ValidationInfo) -> CompletionRequest:
        self.max_tokens = default_within_cap(self, "max_tokens", info, "max_tokens")
        check_total(len(self.prompts()) * (self.best_of or self.n) * self.max_tokens, info)
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 is only allowed with echo, to score the prompt")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError("best_of must be at least n")
        if self.stream and self.best_of is not None and self.best_of > self.n:
            raise ValueError("best_of greater than n cannot be streamed")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def max_new_tokens(self) -> int:
        """max_tokens as validation settled it (never null once validated)."""
        return OPENAI_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    def stop_list(self) -> list[str]:
        return stop_list(self.stop)

    def effective_top_k(self) -> int | None:
        return None if self.top_k is None or self.top_k <= 0 else self.top_k

    def generation_request(self, prompt: str, n: int, deadline: float | None) -> GenerationRequest:
        """What the engine is asked for one of the request's prompts, with `n` choices (n, or best_of)."""
        params = SamplingParams(
            temperature=self.temperature,
            top_k=self.effective_top_k(),
            top_p=self.top_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )
        return GenerationRequest(
            prompt=prompt,
            max_tokens=self.max_new_tokens(),
            params=params,
            seed=self.seed,
            stop=self.stop_list(),
            n=n,
            top_logprobs=self.logprobs or 0,
            deadline=deadline,
        )


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=unix_time)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# --------------------------------------------------------------------------- OpenAI-compatible chat completions


SPEAKER_RULE = r"^[^\n\r]{1,64}$"  # a speaker heading: one line, 1-64 characters (printed in capitals)


class TextPart(RequestModel):
    type: Literal["text"] = Field(description="only text parts; images and audio are refused")
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="system and developer messages are text before the scene (a title, a stage direction); "
        "user and assistant messages are speeches"
    )
    content: str | list[TextPart] = Field(description="the speech, or text parts joined")
    name: str | None = Field(
        None, pattern=SPEAKER_RULE, description="the speaker; default CHAT_USER_NAME or CHAT_ASSISTANT_NAME"
    )

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ResponseFormat(RequestModel):
    type: Literal["text"] = Field(description="only plain text; json_object and json_schema are refused")


class ChatCompletionRequest(RequestModel):
    """OpenAI's chat completions request. The conversation is written as a scene of a play (see
    `service.api.openai.chat.scene`) and the reply is generated as the assistant speaker's next speech."""

    model: str = Field(min_length=1, max_length=128, description=MODEL_DOC.split("; absent")[0])
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(
        None, ge=1, description="characters per reply; null or absent: 256, or MAX_TOKENS if lower"
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens; give one")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopStrings = Field(
        None, description="up to 4 stop strings; the reply also ends where the next speech begins"
    )
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    logprobs: bool = Field(False, description="the log-probability of each character of the reply")
    top_logprobs: int | None = Field(None, ge=0, le=5, description="with logprobs: alternatives per character, up to 5")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = Field(None, max_length=256, description="end-user id; written to the access log")
    logit_bias: dict[str, float] | None = Field(None, description="accepted only empty: {} or null")
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = Field(None, description="accepted only empty: this model calls no tools")
    tool_choice: Literal["none"] | None = Field(None, description="only none")
    parallel_tool_calls: bool | None = Field(None, description="accepted and ignored: no tools are called")

    _stop = field_validator("stop")(check_stop)

    @field_validator("n")
    @classmethod
    def _n(cls, value: int, info: ValidationInfo) -> int | None:
        return check_cap(value, info, "max_n")

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _max_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        return check_cap(value, info, "max_tokens")

    _bias = field_validator("logit_bias")(check_no_bias)

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("this model calls no tools; leave tools out")
        return value

    @model_validator(mode="after")
    def _combinations(self, info: ValidationInfo) -> ChatCompletionRequest:
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise ValueError("give max_tokens or max_completion_tokens, not two different values")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        if not any(m.role in ("user", "assistant") for m in self.messages):
            raise ValueError("give at least one user or assistant message")
        check_total(self.n * self.reply_tokens(settings_of(info).max_tokens), info)
        return self

    def reply_tokens(self, cap: int) -> int:
        """max_tokens as given (either name), else CHAT_DEFAULT_MAX_TOKENS lowered to the cap MAX_TOKENS."""
        given = self.max_tokens or self.max_completion_tokens
        return given if given is not None else min(CHAT_DEFAULT_MAX_TOKENS, cap)

    def stop_list(self) -> list[str]:
        return stop_list(self.stop)

    def generation_request(
        self, prompt: str, max_tokens: int, deadline: float | None, speech_end: str
    ) -> GenerationRequest:
        """What the engine is asked: the reply to the scene `prompt`, which ends at `speech_end` too."""
        params = SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )
        return GenerationRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            params=params,
            seed=self.seed,
            stop=[*self.stop_list(), speech_end],
            n=self.n,
            top_logprobs=(self.top_logprobs or 0) if self.logprobs else 0,
            deadline=deadline,
        )


CHAT_DEFAULT_MAX_TOKENS = 256  # characters of a reply when the request sets no limit: a long speech


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatReply(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    name: str = Field(description="the speaker the reply was written for")


class ChatChoice(BaseModel):
    index: int
    message: ChatReply
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=chat_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=unix_time)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion; with include_usage, a last one without choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
