"""What views need from the app, without importing the factory: the error type, the model registry
kept in `app.extensions` with the leases that requests hold on model versions, and request parsing and
response helpers.

The dependency runs one way: `service.app` -> `service.views` -> `service.helpers` -> `service.repository`
-> `service.engine`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
from typing import Any

import torch
from flask import Response, current_app, g, jsonify, request
from pydantic import BaseModel, ValidationError

from seqmodels.artifacts import LoadedModels
from service import lifecycle
from service.engine import Engine, EngineOptions, PrefixCache, SessionState
from service.kernels import choose_precision
from service.metrics import (
    MODEL_REQUESTS,
    PREFILL_BATCH_PROMPTS,
    PREFIX_CACHE_BYTES,
    PREFIX_CACHE_SHARED_HITS,
    SESSIONS_ISSUED,
    SESSIONS_RESUMED,
    cache_lookup_recorder,
    decode_step_recorder,
)
from service.repository import ModelNotFound, ModelRepository, ModelVersion, RepositoryError
from service.sessions import SessionCodec, SessionError, principal_of
from service.settings import Settings
from service.shared_cache import SharedStates

log = logging.getLogger("service")


class ApiError(Exception):
    """A client mistake or an unavailable service, rendered in OpenAI's error envelope."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class ModelRegistry:
    """The model repository and the session key, kept in `app.extensions["models"]`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Made here, in the gunicorn master before it forks (preload_app), so every worker signs and
        # checks session handles with the same key; SESSION_SECRET keeps it across restarts and replicas.
        secret = settings.session_secret.encode()
        self.session_key = (
            hashlib.sha256(b"charlm-session-key\0" + secret).digest() if secret else secrets.token_bytes(32)
        )
        self.dtype, self.precision_reason = choose_precision(settings.precision)
        self.precision = str(self.dtype).removeprefix("torch.")
        log.info("weights in %s (%s)", self.precision, self.precision_reason)
        self.repository = ModelRepository(settings, self._build_engine, self._add_session_codec)

    def _shared_states(self, models: LoadedModels, model_id: str) -> SharedStates | None:
        """The pod-wide level of the version's prefix cache, where gunicorn.conf.py made a folder for it."""
        folder, size = self.settings.shared_cache_dir, int(self.settings.shared_prefix_cache_mb * 2**20)
        if folder is None or size == 0 or self.settings.prefix_cache_mb == 0:
            return None
        config = models.lm.config
        state = torch.Size([config.num_layers, config.hidden_size])
        name = f"{model_id}-{models.digest[:16]}-{self.precision}.states"
        try:
            shared = SharedStates(folder / name, size, (state, state, torch.Size([models.vocab.size])))
        except OSError as exc:  # a folder gone or read-only: the version serves without the shared level
            log.error("shared prefix cache for %s is off: %s", model_id, exc)
            return None
        return shared

    def _build_engine(self, models: LoadedModels, model_id: str) -> Engine:
        cache_bytes = int(self.settings.prefix_cache_mb * 2**20)
        return Engine(
            models,
            EngineOptions.from_settings(self.settings, self.dtype),
            prefix_cache=PrefixCache(
                cache_bytes,
                cache_lookup_recorder(model_id),
                PREFIX_CACHE_BYTES.labels(model=model_id).set,
                self._shared_states(models, model_id),
                PREFIX_CACHE_SHARED_HITS.labels(model=model_id).inc,
            )
            if cache_bytes > 0
            else None,
            on_generated=decode_step_recorder(model_id),
            on_prefill=PREFILL_BATCH_PROMPTS.observe,
        )

    def _add_session_codec(self, mv: ModelVersion) -> None:
        """Session handles are signed with the version's id and manifest hash: another version finds nothing,
        even one with the same files."""
        config = mv.engine.lm.config
        mv.extras["sessions"] = SessionCodec(
            self.session_key,
            self.settings.session_ttl_seconds,
            f"{mv.id}\0{mv.digest}",
            config.num_layers,
            config.hidden_size,
            mv.engine.vocab.size,
        )
        mv.extras["precision"] = {"dtype": self.precision, "chosen": self.precision_reason}

    def load(self) -> None:
        """Load every model at start-up; RepositoryError when nothing can serve (fail fast)."""
        self.repository.sync()
        loaded = self.repository.versions()
        if not loaded:
            refused = "; ".join(r.message for r in self.repository.refusals().values())
            where = self.settings.model_repository or self.settings.artifacts_dir
            raise RepositoryError(f"no model could be loaded from {where}" + (f": {refused}" if refused else ""))
        default = self.repository.default_name()
        if default is not None and self.repository.serving(default) is None:
            names = ", ".join(sorted({mv.name for mv in loaded}))
            raise RepositoryError(f"DEFAULT_MODEL {default!r} is not among the loaded models ({names})")


def use_model(model: str | None) -> ModelVersion:
    """The version a request's `model` names, held loaded until the request (or its stream) ends; 404
    `model_not_found` for an unknown model or version."""
    repository = registry().repository
    if repository.empty():
        raise ApiError(503, "no model is loaded", "service_unavailable", code="not_ready")
    try:
        mv = repository.acquire(model)
    except ModelNotFound as exc:
        raise ApiError(404, str(exc), "invalid_request_error", param="model", code="model_not_found") from None
    _hold(mv)
    return mv


def _hold(mv: ModelVersion) -> None:
    """Keep the lease for the end of the request; the last version held is the one that answers."""
    g.setdefault("model_leases", []).append(mv)
    g.model_answering = mv


def hand_leases_to_stream(response: Response) -> Response:
    """After the view: count the request for the version that answers; a streamed response holds the
    request's leases until the server closes it (Flask tears the request down when the view returns, before
    the stream is read)."""
    answering = g.get("model_answering")
    if answering is not None:
        MODEL_REQUESTS.labels(model=answering.id).inc()
    if response.is_streamed and g.get("model_leases"):
        repository = registry().repository
        for mv in g.model_leases:
            response.call_on_close(functools.partial(repository.release, mv))
        g.model_leases_handed = True
    return response


def release_models(_: BaseException | None = None) -> None:
    """Teardown: end the leases of a request answered whole, or failed before a stream took them."""
    leases = g.pop("model_leases", [])
    if g.pop("model_leases_handed", False):
        return
    for mv in leases:
        registry().repository.release(mv)


def principal() -> bytes:
    """Whom the current request's sessions belong to: its API key (hashed), or the anonymous principal
    when the server has no keys."""
    if not settings().api_key_list():
        return principal_of(None)
    return principal_of(request.headers.get("Authorization", "").partition(" ")[2].strip())


def open_session(handle: str, mv: ModelVersion, pinned: bool) -> tuple[ModelVersion, SessionState]:
    """The version that made a session handle and the state it carries, for the current principal. A handle
    made by another version of the same model continues on that version while it is loaded, unless the
    request pins a version; any other handle gets 404."""
    repository = registry().repository
    found = _session_on(handle, mv, pinned)
    if found is None and not pinned and repository.sync_for_unknown():  # made by a version not loaded here yet?
        found = _session_on(handle, mv, pinned)
    if found is None:
        raise ApiError(
            404, "session: no such session", "invalid_request_error", param="session", code="session_not_found"
        )
    return found


def _session_on(handle: str, mv: ModelVersion, pinned: bool) -> tuple[ModelVersion, SessionState] | None:
    repository = registry().repository
    candidates = [mv] if pinned else [mv, *(other for other in repository.versions(mv.name) if other is not mv)]
    for candidate in candidates:
        try:
            state = candidate.extras["sessions"].open(handle, principal())
        except SessionError as exc:
            if exc.code == "session_not_found":
                continue
            raise ApiError(404, f"session: {exc}", "invalid_request_error", param="session", code=exc.code) from None
        if candidate is not mv:
            if not repository.acquire_version(candidate):
                continue
            _hold(candidate)
        SESSIONS_RESUMED.labels(model=candidate.id).inc()
        return candidate, state
    return None


def seal_session(mv: ModelVersion, state: SessionState | None) -> str | None:
    if state is None:
        return None
    SESSIONS_ISSUED.labels(model=mv.id).inc()
    sealed: str = mv.extras["sessions"].seal(state, principal())
    return sealed


def registry() -> ModelRegistry:
    reg: ModelRegistry = current_app.extensions["models"]
    return reg


def settings() -> Settings:
    return registry().settings


def request_deadline(timeout: float | None = None) -> float:
    """When the current request's generation must end: REQUEST_DEADLINE_SECONDS from now, its own `timeout`
    from its arrival, or sooner while the server is stopping (service.lifecycle)."""
    return lifecycle.request_deadline(settings().request_deadline_seconds, timeout)


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
