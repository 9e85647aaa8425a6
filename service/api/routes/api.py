"""The /v1 inference routes: parse -> engine -> respond."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from typing import Any

from flask import Blueprint, Response

from service.api.context import (
    mirror,
    open_session,
    parse,
    request_deadline,
    respond,
    runtime,
    seal_session,
    use_model,
)
from service.api.errors import ApiError
from service.api.model_cards import model_entries
from service.api.openapi import documented
from service.api.schemas.common import ModelList, Usage
from service.api.schemas.native import (
    ClassifyRequest,
    ClassifyResponse,
    GenerateChunk,
    GenerateRequest,
    GenerateResponse,
    NextTokenRequest,
    NextTokenResponse,
    ScoreRequest,
    ScoreResponse,
)
from service.api.sse import sse_response
from service.engine.engine import AdaptationUnavailable, ClassifierUnavailable
from service.engine.types import GenerationRequest
from service.metrics import CHARS_SCORED, CLASSIFIED
from service.models.versions import ModelVersion, parse_model

bp = Blueprint("api", __name__, url_prefix="/v1")


@bp.get("/models")
@documented(
    "OpenAI-style list: each model (its serving version) and each loaded version (NAME@VERSION), with metadata",
    ModelList,
)
def list_models() -> Response:
    return respond(ModelList.model_validate({"data": model_entries(runtime().repository)}), exclude_none=False)


@bp.post("/next-token")
@documented("The most likely next characters", NextTokenResponse, NextTokenRequest)
def next_token() -> Response:
    req = parse(NextTokenRequest)
    mv = use_model(req.model)
    result = mv.engine.next_token(req.text, req.top_k)
    mirror(mv, "next_token", req.text, serving_top1=result.candidates[0].token)
    return respond(NextTokenResponse.model_validate({"model": mv.id, **vars(result)}, from_attributes=True))


@bp.post("/generate")
@documented(
    "Continuations of a prompt; server-sent events with stream: true",
    GenerateResponse,
    GenerateRequest,
    stream_chunk=GenerateChunk,
    errors={
        404: "unknown model or version (model_not_found), or an unknown, altered or expired session, or one "
        "made with another API key or model version"
    },
)
def generate() -> Response:
    req = parse(GenerateRequest)
    deadline = request_deadline(req.timeout)
    mv = use_model(req.model)
    session = None
    if req.session is not None:
        pinned = req.model is not None and parse_model(req.model)[1] is not None
        mv, session = open_session(req.session, mv, pinned)
    gen = req.generation_request(deadline, session)
    if req.stream:
        return sse_response(generate_chunks(mv, gen))
    result = mv.engine.generate(gen)
    mirror(mv, "generation", gen.prompt + result.choices[0].text)
    choices = [
        {"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "session": seal_session(mv, c.session)}
        for c in result.choices
    ]
    body = {
        "model": mv.id,
        "choices": choices,
        "usage": Usage.of(result.prompt_tokens, result.completion_tokens).model_dump(),
    }
    return respond(GenerateResponse.model_validate(body))


def generate_chunks(mv: ModelVersion, gen: GenerationRequest) -> Iterator[dict[str, Any]]:
    """One chunk per released piece of text, then one with the usage and no choices."""
    completion_tokens, first_choice = 0, []
    with closing(mv.engine.stream(gen)) as deltas:  # closed at once, not when collected: the rows leave the batch
        for delta in deltas:
            completion_tokens += delta.completion_tokens
            if delta.index == 0:
                first_choice.append(delta.text)
            choice = {"index": delta.index, "text": delta.text, "finish_reason": delta.finish_reason}
            if delta.session is not None:
                choice["session"] = seal_session(mv, delta.session)
            yield {"model": mv.id, "choices": [choice]}
    yield {"model": mv.id, "choices": [], "usage": Usage.of(len(gen.prompt), completion_tokens).model_dump()}
    mirror(mv, "generation", gen.prompt + "".join(first_choice))


@bp.post("/score")
@documented("Log-probability of each text, optionally per character", ScoreResponse, ScoreRequest)
def score() -> Response:
    req = parse(ScoreRequest)
    deadline = request_deadline(req.timeout)
    mv = use_model(req.model)
    try:
        results = mv.engine.score(req.texts, req.include_tokens, adapt=req.adapt, deadline=deadline)
    except AdaptationUnavailable as exc:
        raise ApiError(400, str(exc), "invalid_request_error", param="adapt", code="adapt_unavailable") from None
    except TimeoutError as exc:
        raise ApiError(
            503,
            f"{exc}: adaptive scoring ran past REQUEST_DEADLINE_SECONDS; send fewer characters",
            "service_unavailable",
            code="deadline_exceeded",
        ) from None
    CHARS_SCORED.labels(model=mv.id).inc(sum(len(t) for t in req.texts))
    if not req.adapt:
        for text, result in zip(req.texts, results, strict=True):
            mirror(mv, "score", text, serving_bits=result.bits_per_char * result.n_chars)
    body = ScoreResponse.model_validate({"model": mv.id, "results": results}, from_attributes=True)
    if not req.include_tokens:
        for item in body.results:
            item.tokens = None
    return respond(body)


@bp.post("/classify")
@documented("Genre of each text", ClassifyResponse, ClassifyRequest)
def classify() -> Response:
    req = parse(ClassifyRequest)
    mv = use_model(req.model)
    try:
        results = mv.engine.classify(req.texts)
    except ClassifierUnavailable as exc:
        raise ApiError(
            400, f"{mv.id}: {exc}; use a model with a classifier", "invalid_request_error", "model", "no_classifier"
        ) from None
    CLASSIFIED.labels(model=mv.id).inc(len(req.texts))
    return respond(ClassifyResponse.model_validate({"model": mv.id, "results": results}, from_attributes=True))
