"""Property tests: whatever form a field takes (absent, null, a value on either side of a cap), no response
exceeds any of the server's caps, and every request gets a 200 or a 4xx, never a 5xx."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api.app import create_app
from service.settings import Settings

CAPS = Settings(
    max_tokens=8, max_n=2, max_total_tokens=20, max_top_k=3, max_texts=3, max_text_chars=40, max_adapt_chars=30
)

pytestmark = pytest.mark.unit  # no server: `pytest -m unit` runs these in about a minute
ABSENT = object()
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def capped_app(tiny_artifacts: Path) -> Flask:
    app = create_app(CAPS.model_copy(update={"artifacts_dir": tiny_artifacts}))
    app.config.update(TESTING=True)
    return app


def field(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A request field as a client may send it: left out, null, or a value."""
    return st.one_of(st.just(ABSENT), st.none(), values)


def body_of(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not ABSENT}


around = st.integers(min_value=-1, max_value=12)  # each cap is within this range, with room on both sides
texts = st.text(alphabet="abcdefgh KING.\n", min_size=0, max_size=50)


def post(app: Flask, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = app.test_client().post(path, json=body)
    assert response.status_code < 500, response.get_data(as_text=True)
    if response.mimetype == "text/event-stream":
        events = [line[6:] for line in response.get_data(as_text=True).splitlines() if line.startswith("data: ")]
        return response.status_code, [json.loads(e) for e in events if e != "[DONE]"]
    return response.status_code, response.get_json()


@PROPERTY
@given(text=texts, top_k=field(around))
def test_next_token(capped_app: Flask, text: str, top_k: Any) -> None:
    status, answer = post(capped_app, "/v1/next-token", body_of(text=text, top_k=top_k))
    if status == 200:
        assert len(answer["candidates"]) <= CAPS.max_top_k


@PROPERTY
@given(prompt=texts, max_tokens=field(around), n=field(around), top_k=field(around), stream=field(st.booleans()))
def test_generate(capped_app: Flask, prompt: str, max_tokens: Any, n: Any, top_k: Any, stream: Any) -> None:
    body = body_of(prompt=prompt, max_tokens=max_tokens, n=n, top_k=top_k, stream=stream, seed=1)
    status, answer = post(capped_app, "/v1/generate", body)
    if status != 200:
        return
    if isinstance(answer, list):  # streamed: each event's pieces, per choice
        texts_by_choice: dict[int, str] = {}
        for event in answer:
            for choice in event["choices"]:
                texts_by_choice[choice["index"]] = texts_by_choice.get(choice["index"], "") + choice["text"]
        generated = list(texts_by_choice.values())
    else:
        generated = [choice["text"] for choice in answer["choices"]]
    assert len(generated) <= CAPS.max_n
    assert all(len(text) <= CAPS.max_tokens for text in generated)
    assert sum(map(len, generated)) <= CAPS.max_total_tokens


@PROPERTY
@given(
    prompt=st.one_of(texts, st.lists(texts, min_size=1, max_size=5)),
    max_tokens=field(around),
    n=field(around),
    best_of=field(around),
    echo=field(st.booleans()),
    stream=field(st.booleans()),
    logprobs=field(st.integers(min_value=-1, max_value=6)),
)
def test_completions(
    capped_app: Flask, prompt: Any, max_tokens: Any, n: Any, best_of: Any, echo: Any, stream: Any, logprobs: Any
) -> None:
    body = body_of(
        model="char-lstm", prompt=prompt, max_tokens=max_tokens, n=n, best_of=best_of, echo=echo, stream=stream,
        logprobs=logprobs, seed=1,
    )  # fmt: skip
    status, answer = post(capped_app, "/v1/completions", body)
    if status != 200:
        return
    prompts = [prompt] if isinstance(prompt, str) else prompt
    per_choice: dict[int, str] = {}
    events = answer if isinstance(answer, list) else [answer]
    for event in events:
        for choice in event["choices"]:
            per_choice[choice["index"]] = per_choice.get(choice["index"], "") + choice["text"]
    choices_per_prompt = len(per_choice) // len(prompts)
    assert choices_per_prompt <= CAPS.max_n
    generated = 0
    for index, text in per_choice.items():
        echoed = prompts[index // choices_per_prompt] if echo is True else ""
        assert text.startswith(echoed)
        assert len(text) - len(echoed) <= CAPS.max_tokens
        generated += len(text) - len(echoed)
    assert generated <= CAPS.max_total_tokens
    if not isinstance(answer, list):
        assert answer["usage"]["completion_tokens"] <= CAPS.max_total_tokens  # best_of's unreturned choices too


@PROPERTY
@given(batch=st.lists(texts.filter(bool), min_size=1, max_size=5), adapt=field(st.booleans()))
def test_score_and_classify(capped_app: Flask, batch: list[str], adapt: Any) -> None:
    status, answer = post(capped_app, "/v1/score", body_of(texts=batch, adapt=adapt))
    if status == 200:
        assert len(answer["results"]) == len(batch) <= CAPS.max_texts
        assert all(len(text) <= CAPS.max_text_chars for text in batch)
        assert adapt is not True or sum(map(len, batch)) <= CAPS.max_adapt_chars
    status, answer = post(capped_app, "/v1/classify", {"texts": batch})
    if status == 200:
        assert len(answer["results"]) == len(batch) <= CAPS.max_texts


def test_null_and_absent_mean_the_default_within_the_cap(capped_app: Flask) -> None:
    """The defaults (16 for completions, 64 for generate, 5 candidates) are lowered to the caps, and an
    explicit value over a cap is still refused."""
    for max_tokens in (ABSENT, None):
        body = body_of(model="char-lstm", prompt="KING", max_tokens=max_tokens, temperature=0)
        status, answer = post(capped_app, "/v1/completions", body)
        assert status == 200 and len(answer["choices"][0]["text"]) == CAPS.max_tokens
    status, answer = post(capped_app, "/v1/generate", {"prompt": "KING", "temperature": 0})
    assert status == 200 and len(answer["choices"][0]["text"]) == CAPS.max_tokens
    status, answer = post(capped_app, "/v1/next-token", {"text": "KING"})
    assert status == 200 and len(answer["candidates"]) == CAPS.max_top_k
    # 3 prompts x best_of 2 x the default 8 = 48 > 20: refused, though max_tokens was null.
    body = {"model": "char-lstm", "prompt": ["a", "b", "c"], "best_of": 2, "max_tokens": None}
    status, answer = post(capped_app, "/v1/completions", body)
    assert status == 400 and "at most 20" in answer["error"]["message"]
    status, answer = post(capped_app, "/v1/generate", {"prompt": "KING", "max_tokens": 9})
    assert status == 400 and answer["error"]["param"] == "max_tokens"
