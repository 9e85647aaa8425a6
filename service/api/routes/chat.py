"""OpenAI-compatible POST /v1/chat/completions: the conversation as a scene, the reply as the next speech."""

from __future__ import annotations

import logging

from flask import Blueprint, Response

from service.api.context import parse, request_deadline, respond, settings, use_model
from service.api.errors import ApiError
from service.api.openai.chat import chat_chunks, complete_chat
from service.api.openai.play_script import scene
from service.api.openapi import documented
from service.api.schemas.openai import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from service.api.sse import sse_response

bp = Blueprint("chat", __name__, url_prefix="/v1")
log = logging.getLogger("service.api.openai.chat")


@bp.post("/chat/completions")
@documented(
    "OpenAI Chat Completions: the messages as a scene of a play, the reply as the next speech; server-sent "
    "events with stream: true",
    ChatCompletionResponse,
    ChatCompletionRequest,
    stream_chunk=ChatCompletionChunk,
)
def chat_completions() -> Response:
    req = parse(ChatCompletionRequest)
    config = settings()
    prompt, reply_as = scene(req.messages, config.chat_user_name, config.chat_assistant_name)
    if len(prompt) > config.max_text_chars:
        raise ApiError(
            400,
            f"messages: the conversation is {len(prompt)} characters as a scene; at most {config.max_text_chars} "
            "are allowed (MAX_TEXT_CHARS): send fewer or shorter messages",
            "invalid_request_error",
            param="messages",
            code="conversation_too_long",
        )
    mv = use_model(req.model, req.user)
    if req.user:
        log.info("chat completion requested by user %r", req.user)
    deadline = request_deadline(req.timeout)
    max_tokens = req.reply_tokens(config.max_tokens)
    if req.stream:
        return sse_response(chat_chunks(mv.engine, mv.id, req, prompt, max_tokens, deadline))
    return respond(complete_chat(mv.engine, mv.id, req, prompt, reply_as, max_tokens, deadline), exclude_none=False)
