"""Server-sent events: `data: {json}\\n\\n` per chunk, then `data: [DONE]\\n\\n`."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from flask import Response, stream_with_context

from service.api.schemas.common import ErrorResponse
from service.metrics import GENERATIONS_CANCELLED

log = logging.getLogger("service.api.sse")


def sse_response(chunks: Iterator[dict[str, Any]], done_marker: bool = True) -> Response:
    """Stream `chunks` as SSE, then `data: [DONE]` (OpenAI's end marker; `done_marker=False` for protocols
    whose events are all JSON). If the client goes away, the WSGI server closes this iterator at its next
    write; closing `chunks` in turn stops the generation before another step runs."""

    def events() -> Iterator[str]:
        try:
            for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False, allow_nan=False)}\n\n"
            if done_marker:
                yield "data: [DONE]\n\n"
        except GeneratorExit:
            GENERATIONS_CANCELLED.inc()
            raise
        except Exception:
            # The status line is long gone: end the stream with an error event in the error envelope
            # (as OpenAI's streams do) and no [DONE], so a client cannot mistake it for a full answer.
            log.exception("stream failed")
            error = ErrorResponse.of("internal server error", "server_error", code="internal_error")
            yield f"data: {json.dumps(error)}\n\n"
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    response = Response(stream_with_context(events()), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # tell proxies such as nginx not to buffer the stream
    return response
