"""Liveness and readiness probes; never authenticated."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from service.app import registry

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    models = registry()
    if models.engine is None:
        return jsonify(status="loading"), 503
    return jsonify(status="ready", manifest_sha256=models.engine.models.digest), 200
