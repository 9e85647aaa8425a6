"""Chat clients that only speak /v1/chat/completions, against the real gunicorn server on loopback with
the committed model: the `openai` package, LangChain's ChatOpenAI and LiteLLM's completion()."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from service.models.repository import SINGLE_MODEL
from tests.conftest import COMMITTED_ARTIFACTS, gunicorn_server

KEY = "chat-key"
SCENE: list[Any] = [
    {"role": "system", "content": "Elsinore. A platform before the castle."},
    {"role": "user", "content": "My lord, the king your father's ghost walks tonight."},
]
SAMPLING: dict[str, Any] = {"max_tokens": 120, "seed": 2, "temperature": 0.7}


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with gunicorn_server(COMMITTED_ARTIFACTS, API_KEYS=KEY) as base:
        yield base


def is_a_speech(text: str) -> bool:
    """Words of the plays' language, and no second speaker: the reply ends before the next heading."""
    return bool(text.strip()) and "\n\n" not in text and any(ch.isalpha() for ch in text)


def test_openai_chat_completions(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)
    whole = client.chat.completions.create(model=SINGLE_MODEL, messages=SCENE, max_tokens=120, seed=2, temperature=0.7)
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and is_a_speech(choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model=SINGLE_MODEL,
        messages=SCENE,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=120,
        seed=2,
        temperature=0.7,
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == whole.usage.total_tokens  # type: ignore[union-attr]


def test_a_reply_stops_at_the_next_speakers_turn(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)
    reasons = []
    for seed in range(6):
        reply = client.chat.completions.create(
            model=SINGLE_MODEL,
            messages=SCENE,
            max_tokens=400,
            seed=seed,
            temperature=0.7,
        )
        reasons.append(reply.choices[0].finish_reason)
        assert is_a_speech(reply.choices[0].message.content or "")
    assert "stop" in reasons  # speeches end well before 400 characters


def test_langchain_chat_openai(server: str) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=f"{server}/v1",
        api_key=KEY,  # type: ignore[arg-type]
        model=SINGLE_MODEL,
        max_retries=0,
        **SAMPLING,
    )
    messages = [(m["role"], m["content"]) for m in SCENE]
    answer = chat.invoke(messages)
    assert isinstance(answer.content, str) and is_a_speech(answer.content)
    streamed = "".join(str(chunk.content) for chunk in chat.stream(messages))
    assert streamed == answer.content


# LiteLLM runs in a process of its own: it keeps event loops and worker threads for its logging that
# outlive a call and are only cleaned up at interpreter exit.
LITELLM = """
import json, os, sys
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no download of its price list
import litellm
base, key, model, messages = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
call = dict(model="openai/" + model, api_base=base, api_key=key, messages=messages, max_tokens=120, seed=2,
            temperature=0.7)
whole = litellm.completion(**call).choices[0].message.content
streamed = "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(stream=True, **call))
print(json.dumps({"whole": whole, "streamed": streamed}))
"""


def test_litellm_completion(server: str) -> None:
    args = [sys.executable, "-c", LITELLM, f"{server}/v1", KEY, SINGLE_MODEL, json.dumps(SCENE)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    replies = json.loads(out.stdout.strip().splitlines()[-1])
    assert is_a_speech(replies["whole"]) and replies["streamed"] == replies["whole"]
