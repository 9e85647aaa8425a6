"""Flask application factory: `gunicorn 'service.app:create_app()'`."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

import torch
from flask import Flask, Response, current_app, jsonify, request
from flask_cors import CORS
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException

from service import observability
from service.engine import Engine
from service.metrics import MODEL_LOAD_SECONDS, PREFILL_BATCH_PROMPTS, record_decode_step
from service.observability import configure_logging
from service.schemas import ErrorResponse
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


def _require_api_key() -> None:
    """With API_KEYS set, every /v1 route needs `Authorization: Bearer <key>`; probes stay open."""
    keys = settings().api_key_list()
    if not keys or not request.path.startswith("/v1/"):
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    presented = token.strip().encode()
    matched = False
    for key in keys:  # compare against every key, so the time taken does not reveal which one is close
        matched |= hmac.compare_digest(presented, key.encode())
    if scheme.lower() != "bearer" or not matched:
        raise ApiError(
            401,
            "missing or invalid API key; send Authorization: Bearer <key>",
            "invalid_request_error",
            code="invalid_api_key",
        )


def _error_response(error: ApiError) -> Response:
    response = jsonify(ErrorResponse.of(error.message, error.type, error.param, error.code))
    response.status_code = error.status
    return response


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status, "http_error")
    message = exc.description or exc.name
    if status == 413:
        message = f"request body larger than {settings().max_body_bytes} bytes"
    return _error_response(ApiError(status, message, "invalid_request_error", code=code))


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return _error_response(ApiError(500, "internal server error", "server_error", code="internal_error"))


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings()
    configure_logging(settings.log_level)
    torch.set_num_threads(settings.torch_threads)

    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes, JSON_SORT_KEYS=False)
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.json.sort_keys = False  # type: ignore[attr-defined]

    models = ModelRegistry(settings)
    app.extensions["models"] = models
    models.load()  # fail fast: a missing or tampered artifact stops start-up with a clear message

    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:  # off unless configured: browsers on other origins cannot call the API
        CORS(app, origins=origins, allow_headers=["Authorization", "Content-Type", "X-Request-ID"])
    observability.install(app)  # first: request ids and metrics cover every response, 401s included
    app.before_request(_require_api_key)
    app.register_error_handler(ApiError, _error_response)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)

    from service.views import api, completions, docs, health

    for blueprint in (health.bp, api.bp, completions.bp, docs.bp):
        app.register_blueprint(blueprint)
    return app
