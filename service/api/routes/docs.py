"""/openapi.json and a Swagger UI page at /docs, served from the swagger-ui-py package (no CDN)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, send_from_directory

from service.api.context import settings
from service.api.openapi import build_spec, documented

bp = Blueprint("docs", __name__)


def _swagger_ui_static() -> Path:
    """swagger-ui-py ships Swagger UI 5 (the first to read OpenAPI 3.1) as static files; only those are
    used, so the package itself, with its framework adapters, is never imported."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


SWAGGER_UI_STATIC = _swagger_ui_static()

# The docs page runs Swagger UI's own script and inline styles; nothing is loaded from elsewhere.
DOCS_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'"
)
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>charlm-serve API</title><link rel="icon" href="data:,">
<link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script><script src="/docs/init.js"></script></body></html>
"""
INIT = 'window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});\n'


def _cached_spec() -> dict[str, Any]:
    spec: dict[str, Any] | None = current_app.extensions.get("openapi")
    if spec is None:
        spec = build_spec(current_app, settings())
        current_app.extensions["openapi"] = spec
    return spec


@bp.get("/openapi.json")
@documented("This OpenAPI document")
def openapi_json() -> Response:
    return jsonify(_cached_spec())


@bp.get("/docs")
@documented("Human-readable API documentation (Swagger UI)", content_type="text/html")
def docs_page() -> Response:
    response = Response(PAGE, mimetype="text/html")
    response.headers["Content-Security-Policy"] = DOCS_POLICY
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/docs/init.js")
@documented("Swagger UI start-up script", content_type="text/javascript")
def docs_init() -> Response:
    return Response(INIT, mimetype="text/javascript")


def _asset(name: str) -> Response:
    response = send_from_directory(SWAGGER_UI_STATIC, name, max_age=3600)
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response


@bp.get("/docs/swagger-ui.css")
@documented("Swagger UI style sheet", content_type="text/css")
def docs_css() -> Response:
    return _asset("swagger-ui.css")


@bp.get("/docs/swagger-ui-bundle.js")
@documented("Swagger UI script", content_type="text/javascript")
def docs_js() -> Response:
    return _asset("swagger-ui-bundle.js")
