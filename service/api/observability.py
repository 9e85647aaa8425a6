"""Request ids, structured JSON logs, Prometheus request metrics and response headers.

Request bodies never reach the logs: the access line holds the method, route, status,
duration, sizes and request id only.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, g, has_request_context, request
from pythonjsonlogger.json import JsonFormatter

from service.metrics import IN_FLIGHT, REQUEST_LATENCY, REQUESTS

access_log = logging.getLogger("service.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# A JSON API needs no script, style or framing; /docs relaxes the policy for its own assets.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}


class RequestIdFilter(logging.Filter):
    """Adds the current request id (or "-") to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = g.get("request_id", "-") if has_request_context() else "-"
        return True


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "{asctime}{levelname}{name}{message}{request_id}",
        style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    )


def configure_logging(level: str) -> None:
    """One JSON line per record on stderr, for the app and for gunicorn alike."""
    handler = logging.StreamHandler()
    handler.setFormatter(json_formatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("gunicorn.error", "gunicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def _route() -> str:
    """The URL rule, not the raw path, so that unknown paths cannot blow up the label set."""
    return request.url_rule.rule if request.url_rule is not None else "<unmatched>"


def _before() -> None:
    incoming = request.headers.get("X-Request-ID", "")
    g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
    g.started = time.perf_counter()
    IN_FLIGHT.inc()


def _after(response: Response) -> Response:
    elapsed = time.perf_counter() - g.get("started", time.perf_counter())
    route, status = _route(), str(response.status_code)
    REQUESTS.labels(request.method, route, status).inc()
    REQUEST_LATENCY.labels(request.method, route, status).observe(elapsed)
    response.headers["X-Request-ID"] = g.get("request_id", "-")
    for header, value in SECURITY_HEADERS.items():
        response.headers.setdefault(header, value)
    access_log.info(
        "%s %s %s",
        request.method,
        request.path,
        response.status_code,
        extra={
            "method": request.method,
            "route": route,
            "status": response.status_code,
            "duration_ms": round(elapsed * 1000, 3),
            "bytes_in": request.content_length or 0,
            "streamed": response.is_streamed,
            **({"trace_id": g.trace_id} if "trace_id" in g else {}),
        },
    )
    # A streamed body is still being sent: the request leaves the in-flight count when it closes.
    response.call_on_close(IN_FLIGHT.dec)
    return response


def install(app: Flask) -> None:
    app.before_request(_before)
    app.after_request(_after)
