"""Liveness and readiness probes and Prometheus metrics; never authenticated."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from service.api.context import runtime
from service.api.openapi import documented
from service.api.schemas.common import HealthResponse, NotReadyResponse, ReadyResponse
from service.metrics import render

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@documented("Liveness: 200 while the process is alive", HealthResponse)
def healthz() -> Response:
    return jsonify(status="ok")


@bp.get("/metrics")
@documented("Prometheus metrics, summed over the workers", content_type="text/plain")
def metrics() -> Response:
    repository = runtime().repository
    loaded = {mv.id for mv in repository.versions()}
    body, content_type = render(repository.unloaded_ids - loaded)
    return Response(body, content_type=content_type)


@bp.get("/readyz")
@documented(
    "Readiness: 200 while a model is loaded (rollouts included), 503 otherwise",
    ReadyResponse,
    errors={503: "models not loaded"},
    error_model=NotReadyResponse,
)
def readyz() -> tuple[Response, int]:
    repository = runtime().repository
    default = repository.serving(repository.default_name() or "")
    if default is None:
        return jsonify(status="loading"), 503
    models = {mv.name: mv.version for mv in repository.versions() if mv is repository.serving(mv.name)}
    return jsonify(status="ready", manifest_sha256=default.digest, models=models), 200
