"""The official `openai` client against the real gunicorn server on loopback, with API keys on;
and a client that disconnects mid-stream."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from benchmarks.servers import metric_total
from tests.conftest import gunicorn_server

KEY = "test-key-2"


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path) -> Iterator[str]:
    with gunicorn_server(tiny_artifacts, API_KEYS=f"test-key-1,{KEY}", WORKERS="1") as base:
        yield base


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=30)


def test_models_list(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids == ["char-lstm", "char-lstm@1"]


def test_completion(client: openai.OpenAI) -> None:
    result = client.completions.create(model="char-lstm", prompt="Good morrow", max_tokens=12, seed=3, n=2)
    assert result.object == "text_completion"
    assert [len(c.text) for c in result.choices] == [12, 12]
    assert [c.finish_reason for c in result.choices] == ["length", "length"]
    assert result.usage is not None and result.usage.completion_tokens == 24


def test_streaming_completion(client: openai.OpenAI) -> None:
    # Long enough to outlast a few network round trips: characters already waiting when the server
    # writes are merged into one chunk, so a short answer from the tiny model may arrive in one piece.
    whole = client.completions.create(model="char-lstm", prompt="Alas", max_tokens=1000, seed=5)
    chunks = list(client.completions.create(model="char-lstm", prompt="Alas", max_tokens=1000, seed=5, stream=True))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_echo_logprobs_match_score(client: openai.OpenAI, server: str) -> None:
    prompt = "Shall I compare thee to a summer's day?"
    result = client.completions.create(model="char-lstm", prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens == list(prompt)
    scored = requests.post(
        f"{server}/v1/score",
        json={"texts": [prompt], "include_tokens": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    ).json()["results"][0]
    assert logprobs.token_logprobs == [t["logprob"] for t in scored["tokens"]]


def test_wrong_key_is_an_authentication_error(server: str) -> None:
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="not-a-key", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="char-lstm", prompt="a", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="davinci-002", prompt="a", max_tokens=1)


def metric(server: str, name: str) -> float:
    return metric_total(requests.get(f"{server}/metrics", timeout=5).text, name)


def test_disconnect_mid_stream_stops_generation(tiny_artifacts: Path) -> None:
    """A client reads a few events and hangs up: the server must stop generating at once.
    Checked with the server's own counters, not with timing."""
    cap = 100_000  # far more characters than the socket buffers hold, so only a cancel ends it early
    with gunicorn_server(tiny_artifacts, WORKERS="1", MAX_TOKENS=str(cap), MAX_TOTAL_TOKENS=str(cap)) as server:
        host, port = server.removeprefix("http://").split(":")
        body = json.dumps({"prompt": "O", "max_tokens": cap, "seed": 1, "stream": True}).encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            received = b""
            while received.count(b"data: ") < 5:
                received += sock.recv(4096)
        assert b"text/event-stream" in received

        deadline = time.monotonic() + 30  # bounds the wait; the assertions are on counts
        while metric(server, "charlm_generations_cancelled_total") < 1:
            assert time.monotonic() < deadline, "the server never noticed the disconnect"
            time.sleep(0.05)
        produced = metric(server, "charlm_tokens_generated_total")
        assert 5 <= produced < cap / 10
        # the worker is free again and produces nothing more for the dead stream
        assert requests.get(f"{server}/readyz", timeout=5).status_code == 200
        assert metric(server, "charlm_tokens_generated_total") == produced
