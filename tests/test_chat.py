"""/v1/chat/completions through the Flask test client on the tiny artifacts: the scene template, the
OpenAI shapes, streaming, stops at the next speech, caps and the fields that only make sense neutral."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from service.api.openai.play_script import scene
from service.api.schemas.openai import ChatMessage
from service.models.repository import SINGLE_MODEL

pytestmark = pytest.mark.unit  # no server: `pytest -m unit` runs these in about a minute

MODEL = SINGLE_MODEL


def message(role: str, content: Any, name: str | None = None) -> ChatMessage:
    return ChatMessage.model_validate({"role": role, "content": content, **({"name": name} if name else {})})


def post(client: FlaskClient, body: dict[str, Any]) -> tuple[int, Any]:
    response = client.post("/v1/chat/completions", json={"model": MODEL, **body})
    return response.status_code, response.get_json()


def events(client: FlaskClient, body: dict[str, Any]) -> list[Any]:
    raw = client.post("/v1/chat/completions", json={"model": MODEL, **body, "stream": True}).get_data(as_text=True)
    data = [line[6:] for line in raw.split("\n\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


HELLO = [{"role": "user", "content": "What news, my lord?"}]


# --------------------------------------------------------------------------- the template


def test_a_conversation_becomes_a_scene() -> None:
    messages = [
        message("system", "Elsinore. A platform before the castle."),
        message("user", "Who's there?"),
        message("assistant", "Nay, answer me:\n\nstand, and unfold yourself."),
        message("user", [{"type": "text", "text": "Long live "}, {"type": "text", "text": "the king!"}], "bernardo"),
    ]
    prompt, reply_as = scene(messages, "Horatio", "Hamlet")
    assert prompt == (
        "Elsinore. A platform before the castle.\n\n"
        "HORATIO\nWho's there?\n\n"
        "HAMLET\nNay, answer me:\nstand, and unfold yourself.\n\n"  # a blank line inside a speech would end it
        "BERNARDO\nLong live the king!\n\n"
        "HAMLET\n"
    )
    assert reply_as == "HAMLET"
    named = [message("assistant", "I am here.", "Francisco  of Denmark"), message("user", "Then farewell.")]
    prompt, reply_as = scene(named, "HORATIO", "HAMLET")
    assert reply_as == "FRANCISCO OF DENMARK" and prompt.endswith("HORATIO\nThen farewell.\n\nFRANCISCO OF DENMARK\n")


def test_a_growing_conversation_extends_its_scene() -> None:
    first = [message("user", "What news?")]
    prompt, _ = scene(first, "HORATIO", "HAMLET")
    reply = "None, my lord."
    second = [*first, message("assistant", reply), message("user", "None at all?")]
    assert scene(second, "HORATIO", "HAMLET")[0].startswith(prompt + reply + "\n\n")


# --------------------------------------------------------------------------- the endpoint


def test_reply_has_the_openai_shape_and_is_the_next_speech(client: FlaskClient) -> None:
    status, body = post(client, {"messages": HELLO, "max_tokens": 40, "seed": 3, "n": 2})
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == f"{MODEL}@1"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert choice["message"]["role"] == "assistant" and choice["message"]["name"] == "HAMLET"
        assert "\n\n" not in choice["message"]["content"]
        assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    prompt_chars = len("HORATIO\nWhat news, my lord?\n\nHAMLET\n")
    usage = body["usage"]
    assert usage["prompt_tokens"] == prompt_chars
    assert usage["completion_tokens"] == sum(len(c["message"]["content"]) for c in body["choices"]) + sum(
        2
        for c in body["choices"]
        if c["finish_reason"] == "stop"  # the blank line that ended the speech
    )


def test_the_reply_ends_where_the_next_speech_begins(client: FlaskClient) -> None:
    """The same seed through /v1/generate shows where the text runs on: the reply is what comes before the
    first blank line."""
    prompt = "HORATIO\nWhat news, my lord?\n\nHAMLET\n"
    for seed in range(6):
        plain = client.post("/v1/generate", json={"prompt": prompt, "max_tokens": 50, "seed": seed}).get_json()
        text = plain["choices"][0]["text"]
        body = post(client, {"messages": HELLO, "max_tokens": 50, "seed": seed})[1]
        choice = body["choices"][0]
        assert choice["message"]["content"] == text.split("\n\n")[0]
        assert choice["finish_reason"] == ("stop" if "\n\n" in text else "length")


def test_streaming_gives_the_same_text_as_the_whole_reply(client: FlaskClient) -> None:
    request = {"messages": HELLO, "max_tokens": 40, "seed": 5, "n": 2, "logprobs": True, "top_logprobs": 2}
    whole = post(client, request)[1]
    chunks = events(client, {**request, "stream_options": {"include_usage": True}})
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    texts: dict[int, str] = {0: "", 1: ""}
    logprobs: dict[int, list[Any]] = {0: [], 1: []}
    finish = {}
    for chunk in chunks[2:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"]["content"]
        logprobs[choice["index"]] += choice["logprobs"]["content"]
        if choice["finish_reason"]:
            finish[choice["index"]] = choice["finish_reason"]
    for choice in whole["choices"]:
        assert texts[choice["index"]] == choice["message"]["content"]
        assert finish[choice["index"]] == choice["finish_reason"]
        streamed, complete = logprobs[choice["index"]], choice["logprobs"]["content"]
        assert [t["token"] for t in streamed] == [t["token"] for t in complete]
        assert all(len(t["top_logprobs"]) == 2 and t["bytes"] == list(t["token"].encode()) for t in complete)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_max_completion_tokens_and_the_default_length(client: FlaskClient) -> None:
    body = post(client, {"messages": HELLO, "max_completion_tokens": 5, "seed": 1, "temperature": 0})[1]
    assert len(body["choices"][0]["message"]["content"]) <= 5
    assert post(client, {"messages": HELLO, "max_tokens": 5, "max_completion_tokens": 6})[0] == 400
    body = post(client, {"messages": HELLO, "seed": 2})[1]  # no limit given: 256, or MAX_TOKENS (50 here)
    assert body["usage"]["completion_tokens"] <= 50


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format.type"),
        ({"logit_bias": {"65": 5}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
        ({"messages": [{"role": "tool", "content": "42"}]}, None),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "A title only."}]}, None),
        ({"messages": [{"role": "user", "content": "hi", "name": "two\nlines"}]}, None),
        ({"top_logprobs": 2}, None),
        ({"n": 9}, "n"),
        ({"max_tokens": 51}, "max_tokens"),
        ({"stream_options": {"include_usage": True}}, None),
        ({"functions": []}, "functions"),
    ],
)
def test_what_cannot_apply_is_a_clear_400(client: FlaskClient, extra: dict[str, Any], param: str | None) -> None:
    status, body = post(client, {"messages": HELLO, **extra})
    assert status == 400, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param


@pytest.mark.parametrize(
    "neutral",
    [
        {"logit_bias": {}},
        {"logit_bias": None},
        {"tools": []},
        {"tool_choice": "none"},
        {"response_format": {"type": "text"}},
        {"presence_penalty": 0},
        {"frequency_penalty": 0},
        {"user": "someone"},
        {"parallel_tool_calls": False},
    ],
)
def test_neutral_values_clients_send_by_default_are_accepted(client: FlaskClient, neutral: dict[str, Any]) -> None:
    status, body = post(client, {"messages": HELLO, "max_tokens": 3, **neutral})
    assert status == 200, body


def test_a_conversation_longer_than_the_text_cap_is_refused(client: FlaskClient) -> None:
    turns = [{"role": "user" if i % 2 else "assistant", "content": "x" * 40} for i in range(10)]
    assert post(client, {"messages": turns[:5], "max_tokens": 3})[0] == 200  # about 250 characters as a scene
    status, body = post(client, {"messages": turns, "max_tokens": 3})  # about 500: over MAX_TEXT_CHARS (300)
    assert status == 400 and body["error"]["code"] == "conversation_too_long" and body["error"]["param"] == "messages"


def test_unknown_model_is_404(client: FlaskClient) -> None:
    response = client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO})
    assert response.status_code == 404 and response.get_json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("neutral", [{"logit_bias": {}}, {"suffix": None}, {"logit_bias": None}])
def test_completions_accept_the_same_neutral_fields(client: FlaskClient, neutral: dict[str, Any]) -> None:
    body = {"model": MODEL, "prompt": "a", "max_tokens": 2, **neutral}
    assert client.post("/v1/completions", json=body).status_code == 200


@pytest.mark.parametrize("refused", [{"logit_bias": {"1": 2}}, {"suffix": "the end"}])
def test_completions_refuse_them_when_not_neutral(client: FlaskClient, refused: dict[str, Any]) -> None:
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "a", **refused})
    assert response.status_code == 400 and response.get_json()["error"]["param"] == next(iter(refused))


def test_a_growing_conversation_reuses_the_state_of_the_turns_before(client: FlaskClient) -> None:
    engine = client.application.extensions["models"].repository.serving(MODEL).engine
    cache = engine.prefix_cache
    turns = [{"role": "user", "content": "Speak, speak! I charge thee, speak!"}]
    first = post(client, {"messages": turns, "max_tokens": 30, "seed": 11})[1]
    reply = first["choices"][0]["message"]["content"]
    saved = cache.saved
    grown = [*turns, {"role": "assistant", "content": reply}, {"role": "user", "content": "Stay!"}]
    post(client, {"messages": grown, "max_tokens": 5, "seed": 12})
    assert cache.saved - saved >= len(turns[0]["content"]) + len(reply)  # encoded only the new turn
