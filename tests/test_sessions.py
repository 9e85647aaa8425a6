"""Sessions: signed, self-contained handles that continue a generation where it stopped."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from flask.testing import FlaskClient

from seqmodels.artifacts import load_artifacts
from service.api.app import create_app
from service.engine.engine import Engine, EngineOptions
from service.engine.sampling import SamplingParams
from service.engine.types import GenerationRequest, SessionState
from service.models.sessions import SessionCodec, SessionError, principal_of
from service.settings import Settings
from tests.conftest import booted_workers, gunicorn_process


def codec(secret: bytes = b"k" * 32, model: str = "digest", ttl: float = 60) -> SessionCodec:
    return SessionCodec(secret, ttl, model, layers=2, hidden=16, vocab=40)


def test_a_handle_carries_the_exact_state_and_nothing_else_opens_it() -> None:
    state = SessionState(torch.randn(2, 16), torch.randn(2, 16), 7)
    alpha = principal_of("alpha")
    handle = codec().seal(state, alpha, now=1000.0)
    assert len(handle) == codec().handle_chars
    opened = codec().open(handle, alpha, now=1059.0)
    assert torch.equal(opened.h, state.h) and torch.equal(opened.c, state.c) and opened.next_id == 7

    def refused(code: str, handle: str, principal: bytes = alpha, opener: SessionCodec | None = None) -> None:
        with pytest.raises(SessionError) as caught:
            (opener or codec()).open(handle, principal, now=1000.0)
        assert caught.value.code == code

    refused("session_not_found", handle, principal_of("beta"))  # another API key
    refused("session_not_found", handle, principal_of(None))  # the anonymous principal
    refused("session_not_found", handle, opener=codec(model="other"))  # another model
    refused("session_not_found", handle, opener=codec(secret=b"j" * 32))  # another server secret
    flipped = handle[:50] + ("A" if handle[50] != "A" else "B") + handle[51:]
    refused("session_not_found", flipped)
    refused("session_not_found", handle[:-4])
    for last in "AEIMQUYcgkosw048":  # characters that differ only in a final character's spare bits, or more
        if last != handle[-1]:
            refused("session_not_found", handle[:-1] + last)
    refused("session_not_found", "!" * len(handle))
    with pytest.raises(SessionError) as caught:
        codec().open(handle, alpha, now=1060.0)
    assert caught.value.code == "session_expired"


def test_a_continued_session_equals_generating_from_the_full_text(tiny_artifacts: Path) -> None:
    """In the engine, with log-probabilities: the state and the pending character carry everything."""
    engine = Engine(load_artifacts(tiny_artifacts), EngineOptions(batching=True))
    params = SamplingParams(temperature=0.9)
    first = engine.generate(
        GenerationRequest(prompt="To be, or not", max_tokens=20, params=params, seed=3, n=2, keep_session=True)
    )
    for choice in first.choices:
        assert choice.session is not None
        follow = GenerationRequest(
            prompt=" quoth he. ", max_tokens=30, params=params, seed=9, top_logprobs=2, session=choice.session
        )
        full = GenerationRequest(
            prompt="To be, or not" + choice.text + " quoth he. ", max_tokens=30, params=params, seed=9, top_logprobs=2
        )
        a, b = engine.generate(follow).choices[0], engine.generate(full).choices[0]
        assert a.text == b.text and a.session is None
        torch.testing.assert_close([t.logprob for t in a.tokens], [t.logprob for t in b.tokens], rtol=0, atol=1e-5)


def generate(client: FlaskClient, headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/generate", json=body, headers=headers or {})
    assert response.status_code == 200, response.get_json()
    result: dict[str, Any] = response.get_json()
    return result


def test_sessions_over_the_api_continue_like_the_full_text_with_a_stop_string_included(client: FlaskClient) -> None:
    prompt = "ROMEO. "
    first = generate(client, prompt=prompt, max_tokens=40, seed=4, stop=["e"], n=2, return_session=True)
    assert "stop" in {c["finish_reason"] for c in first["choices"]}
    assert "session" not in generate(client, prompt=prompt, max_tokens=5, seed=4)["choices"][0]
    for choice in first["choices"]:
        said = prompt + choice["text"] + ("e" if choice["finish_reason"] == "stop" else "")
        follow = generate(client, prompt="", session=choice["session"], max_tokens=30, seed=1, temperature=0.7)
        full = generate(client, prompt=said, max_tokens=30, seed=1, temperature=0.7)
        assert follow["choices"][0]["text"] == full["choices"][0]["text"]
        assert follow["usage"]["prompt_tokens"] == 0


def test_a_streamed_choice_returns_its_session_on_its_last_chunk(client: FlaskClient) -> None:
    response = client.post(
        "/v1/generate", json={"prompt": "KING. ", "max_tokens": 12, "seed": 2, "stream": True, "return_session": True}
    )
    events = [json.loads(e[6:]) for e in response.get_data(as_text=True).split("\n\n") if e.startswith("data: {")]
    pieces = [c for e in events for c in e["choices"]]
    assert all("session" not in c for c in pieces[:-1]) and pieces[-1]["finish_reason"] == "length"
    text = "".join(c["text"] for c in pieces)
    follow = generate(client, prompt="\nQUEEN.", session=pieces[-1]["session"], max_tokens=20, seed=5)
    assert (
        follow["choices"][0]["text"]
        == generate(client, prompt="KING. " + text + "\nQUEEN.", max_tokens=20, seed=5)["choices"][0]["text"]
    )


def test_sessions_belong_to_the_key_that_made_them(tiny_artifacts: Path) -> None:
    app = create_app(Settings(artifacts_dir=tiny_artifacts, api_keys="alpha,beta", session_ttl_seconds=60))
    client = app.test_client()
    alpha, beta = {"Authorization": "Bearer alpha"}, {"Authorization": "Bearer beta"}
    handle = generate(client, alpha, prompt="O", max_tokens=5, return_session=True)["choices"][0]["session"]
    assert generate(client, alpha, prompt="!", session=handle, max_tokens=5)["choices"][0]["text"]
    edited = handle[:-1] + ("A" if handle[-1] != "A" else "B")  # even an edit of the spare bits of the last character
    for headers, session in ((beta, handle), (alpha, edited), (alpha, "not a session")):
        body: dict[str, Any] = {"prompt": "", "session": session}
        response = client.post("/v1/generate", json=body, headers=headers)
        assert response.status_code == 404
        assert response.get_json()["error"]["code"] == "session_not_found"
        assert response.get_json()["error"]["param"] == "session"


def test_a_session_continues_on_any_worker(tiny_artifacts: Path) -> None:
    """Eight keep-alive connections at once are spread over both workers (see test_gunicorn); every one
    continues the same handle to the same text, as the full text does."""
    with gunicorn_process(tiny_artifacts, WORKERS="2", SESSION_TTL_SECONDS="60") as (proc, base):
        booted_workers(proc.pid, 2)  # /readyz answers once the first worker is up
        body: dict[str, Any] = {"prompt": "JULIET. ", "max_tokens": 20, "seed": 8, "return_session": True}
        first = requests.post(f"{base}/v1/generate", json=body, timeout=30).json()["choices"][0]
        follow: dict[str, Any] = {"prompt": " Ay me.", "session": first["session"], "max_tokens": 20, "seed": 6}
        full: dict[str, Any] = {"prompt": "JULIET. " + first["text"] + " Ay me.", "max_tokens": 20, "seed": 6}
        expected = requests.post(f"{base}/v1/generate", json=full, timeout=30).json()["choices"][0]["text"]
        with ExitStack() as stack, ThreadPoolExecutor(8) as pool:
            sessions = [stack.enter_context(requests.Session()) for _ in range(8)]
            answers = list(pool.map(lambda s: s.post(f"{base}/v1/generate", json=follow, timeout=30), sessions))
        assert [a.status_code for a in answers] == [200] * 8
        assert {a.json()["choices"][0]["text"] for a in answers} == {expected}
