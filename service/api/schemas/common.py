"""What every request and response model shares: the strict base model, the checks against the operator's
caps (read from the `Settings` passed as validation context, so they fail with the same error shape as the
static bounds), usage, the model list, probes and the one error envelope."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo

from service.settings import Settings

SEED_MAX = (1 << 63) - 1


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


DEFAULT_CAPS = Settings.model_construct()  # the caps' defaults, not the environment: for validation outside the app


def settings_of(info: ValidationInfo) -> Settings:
    """The app's settings, which the app passes as validation context; the defaults without one."""
    context = info.context or {}
    settings = context.get("settings")
    return settings if isinstance(settings, Settings) else DEFAULT_CAPS


def check_text(text: str, info: ValidationInfo) -> str:
    cap = settings_of(info).max_text_chars
    if len(text) > cap:
        raise ValueError(f"at most {cap} characters are allowed, got {len(text)}")
    return text


def check_texts(texts: list[str], info: ValidationInfo) -> list[str]:
    settings = settings_of(info)
    if len(texts) > settings.max_texts:
        raise ValueError(f"at most {settings.max_texts} texts are allowed, got {len(texts)}")
    for i, text in enumerate(texts):
        if len(text) > settings.max_text_chars:
            raise ValueError(f"text {i} has {len(text)} characters; at most {settings.max_text_chars} are allowed")
    return texts


def check_cap(value: int | None, info: ValidationInfo, cap_name: str) -> int | None:
    cap = getattr(settings_of(info), cap_name)
    if value is not None and value > cap:
        raise ValueError(f"must be at most {cap} on this server, got {value}")
    return value


def default_within_cap(model: BaseModel, name: str, info: ValidationInfo, cap_name: str) -> int:
    """The value a field will have when generating: as sent, or, when absent or null, its default lowered to
    the server's cap. An explicit value over the cap is refused by the field's own validator."""
    value = getattr(model, name)
    if name in model.model_fields_set and value is not None:
        return int(value)
    return min(type(model).model_fields[name].default, getattr(settings_of(info), cap_name))


def check_total(total: int, info: ValidationInfo) -> None:
    cap = settings_of(info).max_total_tokens
    if total > cap:
        raise ValueError(f"this request would generate up to {total} characters; at most {cap} are allowed")


def check_stop(value: str | list[str] | None) -> str | list[str] | None:
    if isinstance(value, str) and not 1 <= len(value) <= 64:
        raise ValueError("a stop string must have 1 to 64 characters")
    if isinstance(value, list) and not 1 <= len(value) <= 4:
        raise ValueError("give 1 to 4 stop strings")
    return value


def check_no_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    if value:
        raise ValueError("token biases are not supported (a token is a character here); send {} or leave it out")
    return value


def stop_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


StopStrings = str | list[Annotated[str, Field(min_length=1, max_length=64)]] | None
NonEmptyText = Annotated[str, Field(min_length=1)]


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


class NotReadyResponse(BaseModel):
    status: Literal["loading"]


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
