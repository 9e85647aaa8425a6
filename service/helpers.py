"""What views need from the app, without importing the factory: the error type, the model registry
kept in `app.extensions`, and request parsing and response helpers.

The dependency runs one way: `service.app` -> `service.views` -> `service.helpers` -> `service.engine`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from flask import Response, current_app, jsonify, request
from pydantic import BaseModel, ValidationError

from service.engine import Engine
from service.metrics import MODEL_LOAD_SECONDS, PREFILL_BATCH_PROMPTS, record_decode_step
from service.settings import Settings

log = logging.getLogger("service")


class ApiError(Exception):
    """A client mistake or an unavailable service, rendered in OpenAI's error envelope."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class ModelRegistry:
    """Holds the engine; `engine is None` means not ready (readiness probes say 503)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.load_seconds = 0.0

    def load(self) -> None:
        started = time.perf_counter()
        engine = Engine.from_dir(
            self.settings.artifacts_dir,
            on_generated=record_decode_step,
            on_prefill=PREFILL_BATCH_PROMPTS.observe,
            batching=self.settings.batching,
            max_batch_rows=self.settings.max_batch_rows,
            step_dtype=getattr(torch, self.settings.step_dtype),
            scoring_slots=self.settings.torch_threads,
            batch_gather_seconds=self.settings.batch_gather_ms / 1000,
            stream_interval_seconds=self.settings.stream_interval_ms / 1000,
        )
        self.load_seconds = time.perf_counter() - started
        MODEL_LOAD_SECONDS.set(self.load_seconds)
        self.engine = engine
        for card in engine.describe_models():
            log.info(
                "loaded model %s from %s: %d parameters, sha256 %s, %.2f s",
                card["id"],
                self.settings.artifacts_dir,
                card["parameters"],
                card["artifact_sha256"][:16],
                self.load_seconds,
            )

    def require(self) -> Engine:
        if self.engine is None:
            raise ApiError(503, "models are not loaded yet", "service_unavailable", code="not_ready")
        return self.engine


def registry() -> ModelRegistry:
    reg: ModelRegistry = current_app.extensions["models"]
    return reg


def settings() -> Settings:
    return registry().settings


def parse(model: type[BaseModel]) -> Any:
    """Validate the JSON body against `model`; every failure becomes a 4xx in the error envelope."""
    if request.mimetype != "application/json":
        raise ApiError(
            415,
            "send the request body as JSON with Content-Type: application/json",
            "invalid_request_error",
            code="unsupported_media_type",
        )
    try:
        return model.model_validate_json(request.get_data(cache=False), context={"settings": settings()})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        detail = first["msg"].removeprefix("Value error, ")
        message = detail if param is None else f"{param}: {detail}"
        if len(exc.errors()) > 1:
            message += f" (and {len(exc.errors()) - 1} more errors)"
        code = "invalid_json" if first["type"] == "json_invalid" else first["type"]
        raise ApiError(400, message, "invalid_request_error", param=param, code=code) from None


def respond(payload: BaseModel, status: int = 200, exclude_none: bool = True) -> Response:
    response = jsonify(payload.model_dump(exclude_none=exclude_none))
    response.status_code = status
    return response
