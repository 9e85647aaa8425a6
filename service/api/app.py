"""Flask application factory: `gunicorn 'service.api.app:create_app()'`."""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from flask import Flask, Response, g, jsonify, request
from flask_cors import CORS
from werkzeug.exceptions import HTTPException

from service import lifecycle
from service.api import observability, tracing
from service.api.context import hand_leases_to_stream, key_ring, needs_api_key, release_models, settings
from service.api.errors import ApiError
from service.api.inference_protocol import is_protocol_path
from service.api.observability import configure_logging
from service.api.quotas import KeyRing, QuotaCounters, quota_folder
from service.api.routes import api, chat, completions, docs, health, inference_protocol, playground
from service.api.schemas.common import ErrorResponse
from service.engine import usage
from service.models.runtime import ModelRuntime
from service.settings import Settings

log = logging.getLogger("service")

# Unread request bytes are read and discarded, up to these bounds, before the response goes out.
DRAIN_MAX_BYTES = 64 << 20
DRAIN_SECONDS = 10.0


def _require_api_key() -> None:
    """With API_KEYS or API_KEYS_FILE set, every model route needs `Authorization: Bearer <key>`; probes stay
    open. A key with limits (service.api.quotas) is admitted within them, or refused with 429."""
    usage.reset()
    keys = key_ring()
    if not keys.enabled() or not needs_api_key(request.path):
        return
    policy = keys.authorize(request.headers.get("Authorization", ""))
    if policy is None:
        raise ApiError(
            401,
            "missing or invalid API key; send Authorization: Bearer <key>",
            "invalid_request_error",
            code="invalid_api_key",
        )
    g.key_policy = policy
    if not policy.limited:
        return
    quota = g.quota = keys.admit(policy)
    if quota.refused is not None:
        raise quota.error()
    g.quota_admitted = True


def _quota_headers(response: Response) -> Response:
    """OpenAI's x-ratelimit-* headers on every response to a key with limits; the request's running slot and
    the characters it generated go back to the key's counters when the response (a stream: its end) closes."""
    quota = g.get("quota")
    if quota is None:
        return response
    response.headers.update(quota.headers())
    if g.pop("quota_admitted", False):
        counters, policy = key_ring().counters, g.key_policy
        response.call_on_close(lambda: counters.finish(policy, usage.generated()))
    return response


def _error_response(error: ApiError) -> Response:
    """OpenAI's error envelope, or on /v2 the Open Inference Protocol's `{"error": message}`."""
    if is_protocol_path(request.path):
        response = jsonify({"error": error.message})
    else:
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


def _refuse_when_draining() -> None:
    """A model request that starts after the drain deadline (SIGTERM, see service.lifecycle) could not finish
    before the worker is stopped: 503, so that the client retries on another replica."""
    if needs_api_key(request.path) and lifecycle.draining(time.monotonic()):
        raise ApiError(503, "the server is shutting down; retry", "service_unavailable", code="shutting_down")


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return _error_response(ApiError(500, "internal server error", "server_error", code="internal_error"))


def _drain_request_body(response: Response) -> Response:
    """Read and discard what the client sent that the app did not read (a body over MAX_BODY_BYTES gets
    its 413 before a byte of it is read; a 401 or 404 never reads it), up to DRAIN_MAX_BYTES and
    DRAIN_SECONDS, as production servers do before they answer. Otherwise the server would close a
    socket with unread data after its answer, the kernel would reset the connection, and a client that
    sends its whole body before reading (urllib, for one) would see the reset instead of the 413.
    Beyond the bounds, gunicorn closes the connection after the response, as it did before."""
    stream = request.environ.get("wsgi.input")
    if stream is None:
        return response
    sock = request.environ.get("gunicorn.socket")
    prior = sock.gettimeout() if sock is not None else None
    deadline = time.monotonic() + DRAIN_SECONDS
    drained = 0
    try:
        while drained < DRAIN_MAX_BYTES and (left := deadline - time.monotonic()) > 0:
            if sock is not None:
                sock.settimeout(left)
            data = stream.read(min(1 << 16, DRAIN_MAX_BYTES - drained))
            if not data:
                break
            drained += len(data)
    except (OSError, ValueError):  # a timeout, a reset, a malformed chunk: gunicorn closes the connection
        pass
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(prior)
    if drained:
        log.debug("discarded %d unread request bytes", drained)
    return response


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings()
    configure_logging(settings.log_level)
    # Models load (and their kernels' probes run) on one thread: an OpenMP thread team started here would
    # be unusable in processes forked from this one (gunicorn's workers, which set their own count).
    torch.set_num_threads(1)

    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes)
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.json.sort_keys = False  # type: ignore[attr-defined]

    models = ModelRuntime(settings)
    models.init_app(app)
    counters = QuotaCounters(quota_folder(settings))
    app.extensions["keys"] = KeyRing(settings.api_key_list(), settings.api_keys_file, counters)
    models.load()  # fail fast: a repository with nothing loadable stops start-up with a clear message
    torch.set_num_threads(settings.torch_threads)

    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:  # off unless configured: browsers on other origins cannot call the API
        CORS(app, origins=origins, allow_headers=["Authorization", "Content-Type", "X-Request-ID"])
    # after_request hooks run in reverse order of registration: registered first, the hand-over of a stream's
    # leases runs last, so no hook can fail after it and leave a lease that no stream will end.
    app.after_request(hand_leases_to_stream)  # a stream holds its model version until it is closed
    tracing.install(app, settings)  # off unless OTEL_TRACES_EXPORTER names an exporter
    observability.install(app)  # first: request ids and metrics cover every response, 401s included
    app.before_request(_require_api_key)
    app.after_request(_quota_headers)
    app.before_request(_refuse_when_draining)
    app.after_request(_drain_request_body)
    app.teardown_request(release_models)
    app.register_error_handler(ApiError, _error_response)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)

    blueprints = (health.bp, api.bp, completions.bp, chat.bp, inference_protocol.bp, docs.bp, playground.bp)
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    return app
