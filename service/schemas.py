"""Request and response models, one pair per endpoint.

Requests are strict (no type coercion, no unknown fields, no NaN or Infinity). Limits that
operators configure (text length, max_tokens, n, top_k, list sizes) are read from the
`Settings` passed as validation context, so they fail with the same error shape as the
static bounds.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from service.settings import Settings

SEED_MAX = (1 << 63) - 1


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


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


NonEmptyText = Annotated[str, Field(min_length=1)]


# --------------------------------------------------------------------------- next-token


class NextTokenRequest(RequestModel):
    text: str = Field(description="context; an empty text asks for the first character")
    top_k: int = Field(5, ge=1, description="number of candidates; capped by MAX_TOP_K and the vocabulary size")

    _text = field_validator("text")(_check_text)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int, info: ValidationInfo) -> int | None:
        return _check_cap(value, info, "max_top_k")


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
    prompt: str = Field(description="text to continue; may be empty")
    max_tokens: int = Field(64, ge=1, description="characters to generate; capped by MAX_TOKENS")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 means greedy")
    top_k: int | None = Field(None, ge=1, description="sample among the k most likely characters")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="choice i uses seed + i; same seed, same text")
    stop: str | list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None, description="up to 4 stop strings; the stop text is not returned"
    )
    n: int = Field(1, ge=1, description="choices, generated together as one batch; capped by MAX_N")

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

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, str) and not 1 <= len(value) <= 64:
            raise ValueError("a stop string must have 1 to 64 characters")
        if isinstance(value, list) and not 1 <= len(value) <= 4:
            raise ValueError("give 1 to 4 stop strings")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChoiceOut(BaseModel):
    index: int
    text: str
    finish_reason: Literal["length", "stop"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    model: str
    choices: list[ChoiceOut]
    usage: Usage


# --------------------------------------------------------------------------- score


class ScoreRequest(RequestModel):
    texts: list[NonEmptyText] = Field(min_length=1, description="scored as one batch; at most MAX_TEXTS")
    include_tokens: bool = Field(False, description="also return each character's log-probability")

    _texts = field_validator("texts")(_check_texts)


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
