"""The playground at `/`: one static page, its script module and its style sheet, from
service/api/playground/ (no CDN, no build step). It calls the /v1 API from the browser like any client."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_file

from service.api.openapi import documented

bp = Blueprint("playground", __name__)

PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "playground"

# Only the page's own script and style sheet run; it talks only to this origin; user and model text
# is set as text, never parsed as HTML, so nothing inline is ever needed.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def _file(name: str, mimetype: str) -> Response:
    response = send_file(PLAYGROUND_DIR / name, mimetype=mimetype, max_age=0)
    response.headers["Cache-Control"] = "no-cache"  # revalidated by ETag, so an upgrade is seen at once
    return response


@bp.get("/")
@documented("The playground: generate, next characters, score and classify in the browser", content_type="text/html")
def playground_page() -> Response:
    response = _file("index.html", "text/html")
    response.headers["Content-Security-Policy"] = PAGE_POLICY
    return response


@bp.get("/playground/playground.js")
@documented("The playground's script (an ES module)", content_type="text/javascript")
def playground_js() -> Response:
    return _file("playground.js", "text/javascript")


@bp.get("/playground/playground.css")
@documented("The playground's style sheet", content_type="text/css")
def playground_css() -> Response:
    return _file("playground.css", "text/css")
