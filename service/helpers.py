"""What views need from the app, without importing the factory: the error type, the model registry
kept in `app.extensions`, and request parsing and response helpers.

The dependency runs one way: `service.app` -> `service.views` -> `service.helpers` -> `service.engine`.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from typing import Any

import torch
from flask import Response, current_app, jsonify, request
from pydantic import BaseModel, ValidationError

from service.engine import Engine, PrefixCache, SessionState
from service.metrics import (
    MODEL_LOAD_SECONDS,
    PREFILL_BATCH_PROMPTS,
    PREFIX_CACHE_BYTES,
    record_cache_lookup,
    record_decode_step,
)
from service.sessions import SessionCodec, SessionError, principal_of
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
        self.sessions: SessionCodec | None = None
        self.load_seconds = 0.0
        # Made here, in the gunicorn master before it forks (preload_app), so every worker signs and
        # checks session handles with the same key; SESSION_SECRET keeps it across restarts and replicas.
        secret = settings.session_secret.encode()
        self.session_key = (
            hashlib.sha256(b"charlm-session-key\0" + secret).digest() if secret else secrets.token_bytes(32)
        )

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
            prefix_cache=PrefixCache(int(cache_bytes), record_cache_lookup, PREFIX_CACHE_BYTES.set)
            if (cache_bytes := self.settings.prefix_cache_mb * 2**20) > 0
            else None,
            prefill_chunk=self.settings.prefill_chunk_chars,
        )
        self.load_seconds = time.perf_counter() - started
        MODEL_LOAD_SECONDS.set(self.load_seconds)
        config = engine.lm.config
        self.sessions = SessionCodec(
            self.session_key,
            self.settings.session_ttl_seconds,
            engine.models.digest,
            config.num_layers,
            config.hidden_size,
            engine.vocab.size,
        )
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


def principal() -> bytes:
    """Whom the current request's sessions belong to: its API key (hashed), or the anonymous principal
    when the server has no keys."""
    if not settings().api_key_list():
        return principal_of(None)
    return principal_of(request.headers.get("Authorization", "").partition(" ")[2].strip())


def open_session(handle: str) -> SessionState:
    """The SessionState of a handle the current principal may use; 404 otherwise."""
    codec = registry().sessions
    assert codec is not None
    try:
        return codec.open(handle, principal())
    except SessionError as exc:
        raise ApiError(404, f"session: {exc}", "invalid_request_error", param="session", code=exc.code) from None


def seal_session(state: SessionState | None) -> str | None:
    codec = registry().sessions
    return None if state is None or codec is None else codec.seal(state, principal())


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
