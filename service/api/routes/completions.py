"""OpenAI-compatible POST /v1/completions."""

from __future__ import annotations

import logging

from flask import Blueprint, Response

from service.api.context import mirror, parse, request_deadline, respond, use_model
from service.api.openai.completions import complete, stream_chunks
from service.api.openapi import documented
from service.api.schemas.openai import CompletionRequest, CompletionResponse
from service.api.sse import sse_response

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
    mv = use_model(req.model, req.user)
    if req.user:
        log.info("completion requested by user %r", req.user)
    deadline = request_deadline(req.timeout)
    if req.stream:
        return sse_response(stream_chunks(mv.engine, mv.id, req, deadline))
    answer = complete(mv.engine, mv.id, req, deadline)
    if isinstance(req.prompt, str) and answer.choices and not req.echo:
        mirror(mv, "generation", req.prompt + answer.choices[0].text)
    return respond(answer, exclude_none=False)  # OpenAI sends "logprobs": null
