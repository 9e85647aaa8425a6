"""Request and response models, one pair per endpoint.

Requests are strict (no type coercion, no unknown fields, no NaN or Infinity). Limits that
operators configure (text length, max_tokens, n, top_k, list sizes) are read from the
`Settings` passed as validation context, so they fail with the same error shape as the
static bounds.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from service.settings import Settings

SEED_MAX = (1 << 63) - 1


# Why a choice ended: its stop string, max_tokens, the request's deadline, or the server stopping (SIGTERM).
FinishReason = Literal["length", "stop", "deadline", "shutdown"]


Priority = Literal["interactive", "batch"]


class RequestModel(BaseModel):
    """Fields every /v1 request takes besides its own: how long it may take, and how urgent it is."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    timeout: float | None = Field(
        None,
        gt=0,
        le=3600,
        description="seconds this request may take from its arrival: it is not admitted (503) where it would "
        "wait longer for the model, leaves the queue with 504 `timeout` if it is still waiting then, and a "
        'generation still running then ends with finish_reason "deadline"',
    )
    priority: Priority = Field(
        "interactive",
        description="interactive requests waiting for the model are served before batch ones (first come, first "
        "served within each); a batch request is admitted only while its wait behind everything queued is "
        "within the server's budget",
    )


MODEL_DOC = (
    "a model from /v1/models: NAME for its serving version, NAME@VERSION to pin one; absent or null: the default model"
)
ModelField = Annotated[str | None, Field(None, min_length=1, max_length=128, description=MODEL_DOC)]


def _settings(info: ValidationInfo) -> Settings:
    context = info.context or {}
    settings = context.get("settings")
    return settings if isinstance(settings, Settings) else Settings()


def _check_text(text: str, info: ValidationInfo) -> str:
    cap = _settings(info).max_text_chars
    if len(text) > cap:
        raise ValueError(f"at most {cap} characters are allowed, got {len(text)}")
    return text


def _check_texts(texts: list[str], info: ValidationInfo) -> list[str]:
    settings = _settings(info)
    if len(texts) > settings.max_texts:
        raise ValueError(f"at most {settings.max_texts} texts are allowed, got {len(texts)}")
    for i, text in enumerate(texts):
        if len(text) > settings.max_text_chars:
            raise ValueError(f"text {i} has {len(text)} characters; at most {settings.max_text_chars} are allowed")
    return texts


def _check_cap(value: int | None, info: ValidationInfo, cap_name: str) -> int | None:
    cap = getattr(_settings(info), cap_name)
    if value is not None and value > cap:
        raise ValueError(f"must be at most {cap} on this server, got {value}")
    return value


def _default_within_cap(model: BaseModel, name: str, info: ValidationInfo, cap_name: str) -> int:
    """The value a field will have when generating: as sent, or, when absent or null, its default lowered to
    the server's cap. An explicit value over the cap is refused by the field's own validator."""
    value = getattr(model, name)
    if name in model.model_fields_set and value is not None:
        return int(value)
    return min(type(model).model_fields[name].default, getattr(_settings(info), cap_name))


def _check_total(total: int, info: ValidationInfo) -> None:
    cap = _settings(info).max_total_tokens
    if total > cap:
        raise ValueError(f"this request would generate up to {total} characters; at most {cap} are allowed")


def _check_stop(value: str | list[str] | None) -> str | list[str] | None:
    if isinstance(value, str) and not 1 <= len(value) <= 64:
        raise ValueError("a stop string must have 1 to 64 characters")
    if isinstance(value, list) and not 1 <= len(value) <= 4:
        raise ValueError("give 1 to 4 stop strings")
    return value


def _check_no_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    if value:
        raise ValueError("token biases are not supported (a token is a character here); send {} or leave it out")
    return value


def stop_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


StopStrings = str | list[Annotated[str, Field(min_length=1, max_length=64)]] | None
NonEmptyText = Annotated[str, Field(min_length=1)]


# --------------------------------------------------------------------------- next-token


class NextTokenRequest(RequestModel):
    model: ModelField
    text: str = Field(description="context; an empty text asks for the first character")
    top_k: int = Field(
        5,
        ge=1,
        description="number of candidates; capped by MAX_TOP_K (absent: 5 or the cap, if lower) and the "
        "vocabulary size",
    )

    _text = field_validator("text")(_check_text)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int, info: ValidationInfo) -> int | None:
        return _check_cap(value, info, "max_top_k")

    @model_validator(mode="after")
    def _defaults_within_caps(self, info: ValidationInfo) -> NextTokenRequest:
        self.top_k = _default_within_cap(self, "top_k", info, "max_top_k")
        return self


class CandidateOut(BaseModel):
    token: str
    prob: float
    logprob: float


class NextTokenResponse(BaseModel):
    model: str
    candidates: list[CandidateOut]
    entropy_bits: float


# --------------------------------------------------------------------------- generate


class GenerateRequest(RequestModel):
    model: ModelField
    prompt: str = Field(description="text to continue; may be empty")
    max_tokens: int = Field(
        64, ge=1, description="characters to generate; capped by MAX_TOKENS (absent: 64 or the cap, if lower)"
    )
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 means greedy")
    top_k: int | None = Field(None, ge=1, description="sample among the k most likely characters")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="choice i uses seed + i; same seed, same text")
    stop: StopStrings = Field(None, description="up to 4 stop strings; the stop text is not returned")
    n: int = Field(1, ge=1, description="choices, generated together as one batch; capped by MAX_N")
    stream: bool = Field(False, description="send server-sent events as the text is generated")
    return_session: bool = Field(
        False, description="return a session handle with each choice, to continue from where it stopped"
    )
    session: str | None = Field(
        None,
        min_length=1,
        max_length=65536,
        description="a handle from an earlier response: continue from where that choice stopped (after its "
        "last generated character, a matched stop string included); `prompt` is the text that follows",
    )

    _prompt = field_validator("prompt")(_check_text)

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int, info: ValidationInfo) -> int | None:
        return _check_cap(value, info, "max_tokens")

    @field_validator("n")
    @classmethod
    def _n(cls, value: int, info: ValidationInfo) -> int | None:
        return _check_cap(value, info, "max_n")

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _check_cap(value, info, "max_top_k")

    _stop = field_validator("stop")(_check_stop)

    @model_validator(mode="after")
    def _total(self, info: ValidationInfo) -> GenerateRequest:
        self.max_tokens = _default_within_cap(self, "max_tokens", info, "max_tokens")
        _check_total(self.n * self.max_tokens, info)
        return self

    def stop_list(self) -> list[str]:
        return stop_list(self.stop)


SESSION_DOC = "with return_session: a handle to continue this choice from where it stopped (see `session`)"


class ChoiceOut(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    session: str | None = Field(None, description=SESSION_DOC)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class GenerateResponse(BaseModel):
    model: str
    choices: list[ChoiceOut]
    usage: Usage


class ChoiceDelta(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = Field(description="set on a choice's last chunk")
    session: str | None = Field(None, description=SESSION_DOC + "; on the choice's last chunk")


class GenerateChunk(BaseModel):
    """One server-sent event of a streamed /v1/generate; the last one has no choices and the usage."""

    model: str
    choices: list[ChoiceDelta]
    usage: Usage | None = None


# --------------------------------------------------------------------------- score


class ScoreRequest(RequestModel):
    model: ModelField
    texts: list[NonEmptyText] = Field(min_length=1, description="scored as one batch; at most MAX_TEXTS")
    include_tokens: bool = Field(False, description="also return each character's log-probability")
    adapt: bool = Field(
        False,
        description="dynamic evaluation: score each text segment by segment, taking an SGD step on each scored "
        "segment on a private copy of the weights (every character is still scored before the model trains on "
        "it); lower bits/char on long texts, at many times the cost of plain scoring (a backward pass per "
        "segment; docs/api.md has the figures); at most MAX_ADAPT_CHARS in all",
    )

    _texts = field_validator("texts")(_check_texts)

    @model_validator(mode="after")
    def _adapt_budget(self, info: ValidationInfo) -> ScoreRequest:
        cap = _settings(info).max_adapt_chars
        total = sum(len(t) for t in self.texts)
        if self.adapt and total > cap:
            raise ValueError(f"adaptive scoring takes at most {cap} characters per request, got {total}")
        return self


class TokenOut(BaseModel):
    token: str
    logprob: float


class ScoreOut(BaseModel):
    text: str
    n_chars: int
    logprob: float = Field(description="natural-log probability of the whole text, the sum of the per-token values")
    bits_per_char: float
    perplexity: float
    tokens: list[TokenOut] | None = None


class ScoreResponse(BaseModel):
    model: str
    results: list[ScoreOut]


# --------------------------------------------------------------------------- classify


class ClassifyRequest(RequestModel):
    model: ModelField
    texts: list[NonEmptyText] = Field(min_length=1, description="classified as one batch; at most MAX_TEXTS")

    _texts = field_validator("texts")(_check_texts)


class ClassificationOut(BaseModel):
    label: str
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    model: str
    results: list[ClassificationOut]


# --------------------------------------------------------------------------- models and errors


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    manifest_sha256: str = Field(description="the default model's serving version's manifest hash")
    models: dict[str, int] = Field(description="each model's serving version in this worker")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

    @classmethod
    def of(cls, message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
        return cls(error=ErrorBody(message=message, type=type_, param=param, code=code)).model_dump()


# --------------------------------------------------------------------------- OpenAI-compatible completions


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

    _stop = field_validator("stop")(_check_stop)

    _bias = field_validator("logit_bias")(_check_no_bias)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        if isinstance(value, str):
            return _check_text(value, info)
        if not value:
            raise ValueError("give at least one prompt")
        return _check_texts(value, info)

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _check_cap(value, info, "max_tokens")

    @field_validator("n", "best_of")
    @classmethod
    def _n(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _check_cap(value, info, "max_n")

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _check_cap(value, info, "max_top_k")

    @model_validator(mode="after")
    def _combinations(self, info: ValidationInfo) -> CompletionRequest:
        self.max_tokens = _default_within_cap(self, "max_tokens", info, "max_tokens")
        _check_total(len(self.prompts()) * (self.best_of or self.n) * self.max_tokens, info)
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
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
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
    `service.chat.scene`) and the reply is generated as the assistant speaker's next speech."""

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

    _stop = field_validator("stop")(_check_stop)

    @field_validator("n")
    @classmethod
    def _n(cls, value: int, info: ValidationInfo) -> int | None:
        return _check_cap(value, info, "max_n")

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _max_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _check_cap(value, info, "max_tokens")

    _bias = field_validator("logit_bias")(_check_no_bias)

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
        _check_total(self.n * self.reply_tokens(_settings(info).max_tokens), info)
        return self

    def reply_tokens(self, cap: int) -> int:
        """max_tokens as given (either name), else CHAT_DEFAULT_MAX_TOKENS lowered to the cap MAX_TOKENS."""
        given = self.max_tokens or self.max_completion_tokens
        return given if given is not None else min(CHAT_DEFAULT_MAX_TOKENS, cap)

    def stop_list(self) -> list[str]:
        return stop_list(self.stop)


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
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
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
