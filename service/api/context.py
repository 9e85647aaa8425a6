"""What views need from the app, without importing the factory: the model version a request uses, held
loaded by a lease until the request or its stream ends; its session handles; request parsing and JSON
responses."""

from __future__ import annotations

import functools
from typing import Any

from flask import Response, current_app, g, jsonify, request
from pydantic import BaseModel, ValidationError

from service import lifecycle
from service.api.errors import ApiError
from service.api.inference_protocol import is_protocol_path
from service.api.quotas import KeyRing
from service.engine.types import SessionState
from service.metrics import MODEL_REQUESTS, SESSIONS_ISSUED, SESSIONS_RESUMED
from service.models.runtime import ModelRuntime
from service.models.sessions import SessionError, principal_of
from service.models.shadow import Kind
from service.models.versions import ModelNotFound, ModelVersion
from service.settings import Settings


def needs_api_key(path: str) -> bool:
    """The model routes, which API_KEYS guard and a draining server refuses: /v1/*, and /v2 but for its
    health probes (which Kubernetes and KServe call bare)."""
    return path.startswith("/v1/") or (is_protocol_path(path) and not path.startswith("/v2/health/"))


def sticky_key(user: str | None = None) -> str | None:
    """What keeps a client on one version while a model's traffic is split (service.models.traffic): the
    request's OpenAI `user`, else its API key (hashed), else nothing."""
    if user:
        return "user\0" + user
    if key_ring().enabled():
        return "key\0" + principal().hex()
    return None


def use_model(model: str | None, user: str | None = None) -> ModelVersion:
    """The version a request's `model` names (one by weight, sticky by `user` or API key, where it names no
    version), held loaded until the request (or its stream) ends; 404 `model_not_found` for an unknown model
    or version."""
    repository = runtime().repository
    if repository.empty():
        raise ApiError(503, "no model is loaded", "service_unavailable", code="not_ready")
    try:
        mv = repository.acquire(model, sticky_key(user))
    except ModelNotFound as exc:
        raise ApiError(404, str(exc), "invalid_request_error", param="model", code="model_not_found") from None
    _hold(mv)
    policy = g.get("key_policy")
    if policy is not None and policy.models is not None and mv.name not in policy.models:
        raise ApiError(403, f"this API key may not use the model `{mv.name}`", "invalid_request_error",
                       param="model", code="model_not_allowed")  # fmt: skip
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
        repository = runtime().repository
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
        runtime().repository.release(mv)


def mirror(mv: ModelVersion, kind: Kind, text: str, serving_bits: float | None = None,
           serving_top1: str | None = None) -> None:  # fmt: skip
    """After the answer: offer the request's text for a shadow comparison (service.models.shadow), with what
    the request computed of it."""
    runtime().repository.mirror(mv, kind, text, serving_bits, serving_top1)


def principal() -> bytes:
    """Whom the current request's sessions belong to: its API key (hashed), or the anonymous principal
    when the server has no keys."""
    if not key_ring().enabled():
        return principal_of(None)
    return principal_of(request.headers.get("Authorization", "").partition(" ")[2].strip())


def open_session(handle: str, mv: ModelVersion, pinned: bool) -> tuple[ModelVersion, SessionState]:
    """The version that made a session handle and the state it carries, for the current principal. A handle
    made by another version of the same model continues on that version while it is loaded, unless the
    request pins a version; any other handle gets 404."""
    repository = runtime().repository
    found = _session_on(handle, mv, pinned)
    if found is None and not pinned and repository.sync_for_unknown():  # made by a version not loaded here yet?
        found = _session_on(handle, mv, pinned)
    if found is None:
        raise ApiError(
            404, "session: no such session", "invalid_request_error", param="session", code="session_not_found"
        )
    return found


def _session_on(handle: str, mv: ModelVersion, pinned: bool) -> tuple[ModelVersion, SessionState] | None:
    repository = runtime().repository
    candidates = [mv] if pinned else [mv, *(other for other in repository.versions(mv.name) if other is not mv)]
    for candidate in candidates:
        try:
            assert candidate.sessions is not None  # set when it loaded (ModelRuntime)
            state = candidate.sessions.open(handle, principal())
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
    assert mv.sessions is not None
    sealed: str = mv.sessions.seal(state, principal())
    return sealed


def runtime() -> ModelRuntime:
    models: ModelRuntime = current_app.extensions["models"]
    return models


def key_ring() -> KeyRing:
    keys: KeyRing = current_app.extensions["keys"]
    return keys


def settings() -> Settings:
    return runtime().settings


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
    g.parsed_request = parsed = validated(model, request.get_data(cache=False))  # its fields go on its trace
    return parsed


def validated(model: type[BaseModel], data: bytes | dict[str, Any], where: str = "") -> Any:
    """`data` (JSON bytes, or an object already parsed) as `model`, checked against the app's caps; a failure
    is a 400 naming the field (under `where`, for an object nested in the body)."""
    try:
        context = {"settings": settings()}
        if isinstance(data, bytes):
            return model.model_validate_json(data, context=context)
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = ".".join(str(part) for part in (*([where] if where else []), *first["loc"])) or None
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
