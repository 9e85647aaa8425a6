"""OpenAI-compatible POST /v1/completions."""

from __future__ import annotations

import logging
import time

from flask import Blueprint, Response

from service.engine import LM_ID
from service.helpers import ApiError, parse, registry, respond, settings
from service.openai_compat import complete, stream_chunks
from service.openapi import documented
from service.schemas import CompletionRequest, CompletionResponse
from service.streaming import sse_response

bp = Blueprint("completions", __name__, url_prefix="/v1")
log = logging.getLogger("service.completions")


@bp.post("/completions")
@documented(
    "OpenAI legacy Completions (vLLM-compatible); server-sent events with stream: true",
    CompletionResponse,
    CompletionRequest,
    stream_chunk=CompletionResponse,
)
def completions() -> Response:
    req = parse(CompletionRequest)
    engine = registry().require()
    if req.model != LM_ID:
        raise ApiError(
            404,
            f"The model `{req.model}` does not exist or does not complete text; use `{LM_ID}`",
            "invalid_request_error",
            param="model",
            code="model_not_found",
        )
    if req.user:
        log.info("completion requested by user %r", req.user)
    deadline = time.monotonic() + settings().request_deadline_seconds
    if req.stream:
        return sse_response(stream_chunks(engine, req, deadline))
    return respond(complete(engine, req, deadline), exclude_none=False)  # OpenAI sends "logprobs": null
