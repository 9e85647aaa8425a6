"""OpenAI's chat completions on a play-script model (no Flask here): the conversation is written as a scene
(service.api.openai.play_script), and the reply is the next speech, ended by the blank line before the
next speaker (not returned; finish_reason "stop")."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from typing import Any

from service.api.openai.play_script import SPEECH_END
from service.api.schemas.common import Usage
from service.api.schemas.openai import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatReply,
    TokenLogprob,
    TopLogprob,
    chat_completion_id,
    unix_time,
)
from service.engine.engine import Engine
from service.engine.types import TokenScore


def chat_logprobs(tokens: list[TokenScore], top: int) -> ChatLogprobs:
    """OpenAI's chat logprobs: each character with its log-probability, bytes and `top` alternatives."""

    def alternative(token: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    content = []
    for t in tokens:
        ranked = sorted({**(t.top_logprobs or {}), t.token: t.logprob}.items(), key=lambda item: -item[1])
        content.append(
            TokenLogprob(
                token=t.token,
                logprob=t.logprob,
                bytes=list(t.token.encode()),
                top_logprobs=[alternative(token, lp) for token, lp in ranked[:top]],
            )
        )
    return ChatLogprobs(content=content)


def complete_chat(
    engine: Engine, model: str, req: ChatCompletionRequest, prompt: str, reply_as: str, max_tokens: int,
    deadline: float | None = None,
) -> ChatCompletionResponse:  # fmt: skip
    """A whole (non-streamed) chat completion: n replies to the scene `prompt`."""
    result = engine.generate(req.generation_request(prompt, max_tokens, deadline, SPEECH_END))
    choices = [
        ChatChoice(
            index=choice.index,
            message=ChatReply(content=choice.text, name=reply_as),
            logprobs=chat_logprobs(choice.tokens, req.top_logprobs or 0) if req.logprobs else None,
            finish_reason=choice.finish_reason,  # type: ignore[arg-type]
        )
        for choice in result.choices
    ]
    return ChatCompletionResponse(
        model=model,
        choices=choices,
        usage=Usage.of(len(prompt), result.completion_tokens),
    )


def chat_chunks(
    engine: Engine, model: str, req: ChatCompletionRequest, prompt: str, max_tokens: int,
    deadline: float | None = None,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """chat.completion.chunk events: each choice's role first, then its text as it is released, the last
    piece with its finish_reason; with stream_options.include_usage, a last chunk with the usage."""
    header = {"id": chat_completion_id(), "object": "chat.completion.chunk", "created": unix_time(), "model": model}

    def chunk(index: int, delta: dict[str, str], logprobs: ChatLogprobs | None, finish: str | None) -> dict:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs and logprobs.model_dump(),
            "finish_reason": finish,
        }
        return {**header, "choices": [choice]}

    for index in range(req.n):
        yield chunk(index, {"role": "assistant", "content": ""}, None, None)
    completion_tokens = 0
    with closing(engine.stream(req.generation_request(prompt, max_tokens, deadline, SPEECH_END))) as deltas:
        for delta in deltas:
            completion_tokens += delta.completion_tokens
            logprobs = chat_logprobs(delta.tokens, req.top_logprobs or 0) if req.logprobs else None
            yield chunk(delta.index, {"content": delta.text}, logprobs, delta.finish_reason)
    if req.stream_options is not None and req.stream_options.include_usage:
        yield {**header, "choices": [], "usage": Usage.of(len(prompt), completion_tokens).model_dump()}
