"""The legacy OpenAI Completions API on top of the engine (no Flask here).

Differences from OpenAI and vLLM, on purpose:
- A token is one character.
- With `echo`, the first prompt token has a real log-probability (the model scores it from
  its start state) instead of null; the values equal those of /v1/score for the same text.
- Reported log-probabilities are the model's own distribution, before temperature,
  top-k/top-p and penalties, so `max_tokens: 1, logprobs: 5` matches /v1/next-token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from typing import Any

from service.api.schemas.common import Usage
from service.api.schemas.openai import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    completion_id,
    unix_time,
)
from service.engine.engine import Engine
from service.engine.types import Delta, TokenScore
from service.metrics import CHARS_SCORED


def logprobs_block(tokens: list[TokenScore], offset: int) -> CompletionLogprobs:
    """OpenAI's logprobs object; `top_logprobs` always includes the chosen token, as OpenAI's does."""
    offsets, position = [], offset
    for token in tokens:
        offsets.append(position)
        position += len(token.token)
    return CompletionLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[{**(t.top_logprobs or {}), t.token: t.logprob} for t in tokens],
        text_offset=offsets,
    )


def prompt_tokens(engine: Engine, model: str, req: CompletionRequest, prompt: str) -> list[TokenScore]:
    if not prompt or not req.echo:
        return []
    CHARS_SCORED.labels(model=model).inc(len(prompt))
    return engine.score([prompt], include_tokens=True, top_logprobs=req.logprobs or 0)[0].tokens


def complete(engine: Engine, model: str, req: CompletionRequest, deadline: float | None = None) -> CompletionResponse:
    """A whole (non-streaming) completion: n choices per prompt, the best n of best_of when asked."""
    choices: list[CompletionChoice] = []
    prompt_total = completion_total = 0
    for prompt_index, prompt in enumerate(req.prompts()):
        echoed = prompt_tokens(engine, model, req, prompt)
        prompt_total += len(prompt)
        generated: list[Delta]
        if req.max_tokens == 0:
            generated = [Delta(index=i, text="", tokens=[], finish_reason="length") for i in range(req.n)]
        else:
            result = engine.generate(req.generation_request(prompt, req.best_of or req.n, deadline))
            completion_total += result.completion_tokens
            generated = result.choices
            if req.best_of is not None and req.best_of > req.n:  # keep the n most likely of best_of
                generated = sorted(generated, key=lambda c: -c.cumulative_logprob)[: req.n]
        for j, choice in enumerate(generated):
            text = (prompt if req.echo else "") + choice.text
            logprobs = None
            if req.logprobs is not None:
                logprobs = logprobs_block(echoed + choice.tokens, 0 if req.echo else len(prompt))
            choices.append(
                CompletionChoice(
                    text=text,
                    index=prompt_index * req.n + j,
                    logprobs=logprobs,
                    finish_reason=choice.finish_reason,  # type: ignore[arg-type]
                )
            )
    return CompletionResponse(
        model=model,
        choices=choices,
        usage=Usage.of(prompt_total, completion_total),
    )


def stream_chunks(
    engine: Engine, model: str, req: CompletionRequest, deadline: float | None = None
) -> Iterator[dict[str, Any]]:
    """Chunks for server-sent events, each one a text_completion with the choices that moved."""
    header = {"id": completion_id(), "object": "text_completion", "created": unix_time(), "model": model}

    def chunk(index: int, text: str, tokens: list[TokenScore] | None, offset: int, finish: str | None) -> dict:
        logprobs = logprobs_block(tokens, offset).model_dump() if tokens is not None else None
        return {**header, "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}]}

    prompt_total = completion_total = 0
    want_logprobs = req.logprobs is not None
    for prompt_index, prompt in enumerate(req.prompts()):
        prompt_total += len(prompt)
        base = prompt_index * req.n
        if req.echo and prompt:
            echoed = prompt_tokens(engine, model, req, prompt)
            for j in range(req.n):
                yield chunk(base + j, prompt, echoed if want_logprobs else None, 0, None)
        if req.max_tokens == 0:
            for j in range(req.n):
                yield chunk(base + j, "", [] if want_logprobs else None, len(prompt), "length")
            continue
        offsets = [len(prompt)] * req.n
        with closing(engine.stream(req.generation_request(prompt, req.n, deadline))) as deltas:
            for delta in deltas:
                yield chunk(
                    base + delta.index,
                    delta.text,
                    delta.tokens if want_logprobs else None,
                    offsets[delta.index],
                    delta.finish_reason,
                )
                offsets[delta.index] += len(delta.text)
                completion_total += delta.completion_tokens
    if req.stream_options is not None and req.stream_options.include_usage:
        yield {**header, "choices": [], "usage": Usage.of(prompt_total, completion_total).model_dump()}
