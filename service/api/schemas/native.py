"""The native API's request and response models, one pair per endpoint (/v1/next-token, /v1/generate,
/v1/score, /v1/classify). Requests are strict: no type coercion, no unknown fields, no NaN or Infinity."""

from __future__ import annotations

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from service.api.schemas.common import (
    SEED_MAX,
    ModelField,
    NonEmptyText,
    RequestModel,
    StopStrings,
    Usage,
    check_cap,
    check_stop,
    check_text,
    check_texts,
    check_total,
    default_within_cap,
    settings_of,
    stop_list,
)
from service.engine.sampling import SamplingParams
from service.engine.types import FinishReason, GenerationRequest, SessionState

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

    _text = field_validator("text")(check_text)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int, info: ValidationInfo) -> int | None:
        return check_cap(value, info, "max_top_k")

    @model_validator(mode="after")
    def _defaults_within_caps(self, info: ValidationInfo) -> NextTokenRequest:
        self.top_k = default_within_cap(self, "top_k", info, "max_top_k")
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

    _prompt = field_validator("prompt")(check_text)

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int, info: ValidationInfo) -> int | None:
        return check_cap(value, info, "max_tokens")

    @field_validator("n")
    @classmethod
    def _n(cls, value: int, info: ValidationInfo) -> int | None:
        return check_cap(value, info, "max_n")

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None, info: ValidationInfo) -> int | None:
        return check_cap(value, info, "max_top_k")

    _stop = field_validator("stop")(check_stop)

    @model_validator(mode="after")
    def _total(self, info: ValidationInfo) -> GenerateRequest:
        self.max_tokens = default_within_cap(self, "max_tokens", info, "max_tokens")
        check_total(self.n * self.max_tokens, info)
        return self

    def stop_list(self) -> list[str]:
        return stop_list(self.stop)

    def generation_request(self, deadline: float, session: SessionState | None = None) -> GenerationRequest:
        """What the engine is asked: this request's sampling, stops and choices, ending by `deadline`."""
        return GenerationRequest(
            prompt=self.prompt,
            max_tokens=self.max_tokens,
            params=SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p),
            seed=self.seed,
            stop=self.stop_list(),
            n=self.n,
            deadline=deadline,
            session=session,
            keep_session=self.return_session,
        )


SESSION_DOC = "with return_session: a handle to continue this choice from where it stopped (see `session`)"


class ChoiceOut(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    session: str | None = Field(None, description=SESSION_DOC)


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

    _texts = field_validator("texts")(check_texts)

    @model_validator(mode="after")
    def _adapt_budget(self, info: ValidationInfo) -> ScoreRequest:
        cap = settings_of(info).max_adapt_chars
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

    _texts = field_validator("texts")(check_texts)


class ClassificationOut(BaseModel):
    label: str
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    model: str
    results: list[ClassificationOut]
