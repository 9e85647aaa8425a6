"""OpenAI-compatible completions, server-sent events, stop handling and API keys (Flask test client)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from service.api.app import create_app
from service.engine.stop_strings import StopMatcher
from service.engine.types import TokenScore
from service.models.repository import SINGLE_MODEL as LM_ID
from service.settings import Settings
from tests.test_api import assert_error, post

pytestmark = pytest.mark.unit  # no server: `pytest -m unit` runs these in about a minute


def completion(client: FlaskClient, **body: Any) -> dict[str, Any]:
    status, payload = post(client, "/v1/completions", {"model": LM_ID, **body})
    assert status == 200, payload
    return payload


def read_events(response: Any) -> list[Any]:
    """Parse an SSE body strictly: `data: <json>` events separated by blank lines, ending in [DONE]."""
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    raw = response.get_data(as_text=True)
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")
    assert events[-1] == ""
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    assert events[-2] == "data: [DONE]"
    return [json.loads(e[len("data: ") :]) for e in events[:-2]]


def stream_text(chunks: list[dict[str, Any]]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


# --------------------------------------------------------------------------- non-streaming


def test_completion_shape(client: FlaskClient) -> None:
    body = completion(client, prompt="Friends, Romans", max_tokens=10, seed=1)
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["model"] == f"{LM_ID}@1"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and len(choice["text"]) == 10
    assert choice["logprobs"] is None and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 15, "completion_tokens": 10, "total_tokens": 25}


def test_max_tokens_defaults_to_16(client: FlaskClient) -> None:
    assert len(completion(client, prompt="a", seed=2)["choices"][0]["text"]) == 16


def test_prompt_list_and_n_index_choices_per_prompt(client: FlaskClient) -> None:
    body = completion(client, prompt=["one", "two"], n=2, max_tokens=5, seed=3)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 6 and body["usage"]["completion_tokens"] == 20


def test_completion_matches_generate_for_the_same_seed(client: FlaskClient) -> None:
    body = completion(client, prompt="Sweet", max_tokens=25, seed=9, temperature=0.9, top_k=20)
    gen = post(
        client, "/v1/generate", {"prompt": "Sweet", "max_tokens": 25, "seed": 9, "temperature": 0.9, "top_k": 20}
    )
    assert body["choices"][0]["text"] == gen[1]["choices"][0]["text"]


def test_vllm_top_k_minus_one_means_off(client: FlaskClient) -> None:
    off = completion(client, prompt="a", max_tokens=20, seed=4, top_k=-1)
    default = completion(client, prompt="a", max_tokens=20, seed=4)
    assert off["choices"][0]["text"] == default["choices"][0]["text"]


def test_echo_logprobs_with_zero_max_tokens_scores_the_prompt_like_score(client: FlaskClient) -> None:
    prompt = "Now is the winter of our discontent"
    body = completion(client, prompt=prompt, echo=True, logprobs=3, max_tokens=0)
    [choice] = body["choices"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == list(prompt)
    assert logprobs["text_offset"] == list(range(len(prompt)))
    assert logprobs["token_logprobs"][0] is not None  # unlike vLLM, the first token has a real logprob
    scored = post(client, "/v1/score", {"texts": [prompt], "include_tokens": True})[1]["results"][0]["tokens"]
    assert logprobs["token_logprobs"] == [t["logprob"] for t in scored]  # exactly equal
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True):
        assert token in top and 3 <= len(top) <= 4
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}


def test_one_token_with_logprobs_5_matches_next_token(client: FlaskClient) -> None:
    prompt = "What's in a na"
    body = completion(client, prompt=prompt, max_tokens=1, logprobs=5, temperature=0)
    top = body["choices"][0]["logprobs"]["top_logprobs"][0]
    candidates = post(client, "/v1/next-token", {"text": prompt, "top_k": 5})[1]["candidates"]
    assert sorted(top.items(), key=lambda kv: -kv[1]) == [(c["token"], c["logprob"]) for c in candidates]
    assert body["choices"][0]["logprobs"]["text_offset"] == [len(prompt)]


def test_echo_with_generation_concatenates_and_offsets(client: FlaskClient) -> None:
    body = completion(client, prompt="Hark", echo=True, logprobs=0, max_tokens=6, seed=5)
    choice = body["choices"][0]
    assert choice["text"].startswith("Hark") and len(choice["text"]) == 10
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
    assert choice["logprobs"]["text_offset"] == list(range(10))


def test_best_of_returns_the_most_likely_n(client: FlaskClient) -> None:
    body = completion(client, prompt="I", max_tokens=8, n=2, best_of=3, seed=6, logprobs=0)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in body["choices"]]
    assert sums == sorted(sums, reverse=True)
    assert body["usage"]["completion_tokens"] == 24  # all best_of candidates are generated


def test_penalties_are_honoured(client: FlaskClient) -> None:
    plain = completion(client, prompt="", max_tokens=40, temperature=0)["choices"][0]["text"]
    penalized = completion(client, prompt="", max_tokens=40, temperature=0, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized["choices"][0]["text"] != plain
    assert len(set(penalized["choices"][0]["text"])) > len(set(plain))


def test_user_field_is_accepted(client: FlaskClient) -> None:
    assert completion(client, prompt="a", max_tokens=1, user="user-1234")["choices"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "a", "max_tokens": 0}, None),
        ({"prompt": "a", "logprobs": 6}, "logprobs"),
        ({"prompt": [1, 2, 3]}, None),
        ({"prompt": []}, "prompt"),
        ({"prompt": "a", "n": 2, "best_of": 1}, None),
        ({"prompt": "a", "best_of": 2, "stream": True}, None),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, None),
        ({"prompt": "a", "suffix": "b"}, "suffix"),
        ({"prompt": "a", "logit_bias": {"1": 5}}, "logit_bias"),
        ({"prompt": "a", "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": "a", "frequency_penalty": -3}, "frequency_penalty"),
        ({"prompt": "a", "top_k": -2}, "top_k"),
        ({"prompt": "a", "temperature": "hot"}, "temperature"),
        ({"prompt": "a", "max_tokens": 51}, "max_tokens"),
    ],
)
def test_completion_errors(client: FlaskClient, body: dict[str, Any], param: str | None) -> None:
    assert_error(*post(client, "/v1/completions", {"model": LM_ID, **body}), 400, param)


def test_model_is_required_and_unknown_model_is_404(client: FlaskClient) -> None:
    assert_error(*post(client, "/v1/completions", {"prompt": "a"}), 400, "model")
    status, body = post(client, "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "a"})
    assert_error(status, body, 404, "model")
    assert body["error"]["code"] == "model_not_found"
    for unknown in ("mlp-classifier", f"{LM_ID}@2", f"{LM_ID}@0", f"{LM_ID}@x"):
        status, body = post(client, "/v1/completions", {"model": unknown, "prompt": "a"})
        assert_error(status, body, 404, "model")
        assert body["error"]["code"] == "model_not_found"


# --------------------------------------------------------------------------- streaming


def test_streamed_completion_equals_the_whole_one(client: FlaskClient) -> None:
    request = {"model": LM_ID, "prompt": ["Good", "Bad"], "max_tokens": 30, "seed": 8, "n": 2, "logprobs": 2}
    whole = post(client, "/v1/completions", request)[1]
    chunks = read_events(client.post("/v1/completions", json={**request, "stream": True}))
    assert len(chunks) >= 4  # a chunk per choice at least; characters waiting together arrive merged
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "text_completion" and c["model"] == f"{LM_ID}@1" for c in chunks)
    assert stream_text(chunks) == {c["index"]: c["text"] for c in whole["choices"]}
    finals = {ch["index"]: ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]}
    assert finals == {c["index"]: c["finish_reason"] for c in whole["choices"]}
    streamed_lp: dict[int, list[float]] = {}
    for c in chunks:
        for ch in c["choices"]:
            streamed_lp.setdefault(ch["index"], []).extend(ch["logprobs"]["token_logprobs"])
    assert streamed_lp == {c["index"]: c["logprobs"]["token_logprobs"] for c in whole["choices"]}


def test_stream_include_usage(client: FlaskClient) -> None:
    body = {"model": LM_ID, "prompt": "ab", "max_tokens": 7, "stream": True, "stream_options": {"include_usage": True}}
    chunks = read_events(client.post("/v1/completions", json=body))
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}


def test_stream_echo_with_zero_max_tokens(client: FlaskClient) -> None:
    body = {"model": LM_ID, "prompt": "Alas", "max_tokens": 0, "echo": True, "logprobs": 1, "stream": True}
    chunks = read_events(client.post("/v1/completions", json=body))
    assert stream_text(chunks) == {0: "Alas"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_honours_stop_across_chunks(client: FlaskClient) -> None:
    full = completion(client, prompt="", max_tokens=50, temperature=0)["choices"][0]["text"]
    stop = full[20:24]
    cut = full.index(stop)
    body = {"model": LM_ID, "prompt": "", "max_tokens": 50, "temperature": 0, "stop": [stop], "stream": True}
    chunks = read_events(client.post("/v1/completions", json=body))
    assert stream_text(chunks) == {0: full[:cut]}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_generate_streams_too(client: FlaskClient) -> None:
    request = {"prompt": "Hence", "max_tokens": 20, "seed": 1, "n": 2}
    whole = post(client, "/v1/generate", request)[1]
    chunks = read_events(client.post("/v1/generate", json={**request, "stream": True}))
    assert stream_text(chunks) == {c["index"]: c["text"] for c in whole["choices"]}
    assert chunks[-1] == {"model": f"{LM_ID}@1", "choices": [], "usage": whole["usage"]}


def test_stream_validation_errors_are_plain_json(client: FlaskClient) -> None:
    response = client.post("/v1/generate", json={"prompt": "a", "max_tokens": 0, "stream": True})
    assert response.mimetype == "application/json"
    assert_error(response.status_code, response.get_json(), 400, "max_tokens")


def test_stop_matcher_holds_back_partial_stops() -> None:
    matcher = StopMatcher(["END", "xy"])
    released = []
    for ch in "abcEN":
        out, stopped = matcher.push(TokenScore(ch, -1.0))
        assert not stopped
        released += [t.token for t in out]
    assert "".join(released) == "abc"  # "EN" might begin "END"
    out, stopped = matcher.push(TokenScore("D", -1.0))
    assert stopped and out == []
    again = StopMatcher(["END"])
    assert [t.token for t in again.push(TokenScore("E", 0.0))[0]] == []
    assert [t.token for t in again.push(TokenScore("x", 0.0))[0]] == ["E", "x"]


# --------------------------------------------------------------------------- API keys


def test_api_keys_guard_v1_routes_only(tiny_artifacts: Any) -> None:
    app = create_app(Settings(artifacts_dir=tiny_artifacts, api_keys="alpha, beta"))
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic alpha"},
        {"Authorization": "alpha"},
    ):
        response = client.get("/v1/models", headers=headers)
        assert_error(response.status_code, response.get_json(), 401)
        assert response.get_json()["error"]["code"] == "invalid_api_key"
    for key in ("alpha", "beta"):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    response = client.post(
        "/v1/completions", json={"model": LM_ID, "prompt": "a"}, headers={"Authorization": "Bearer beta"}
    )
    assert response.status_code == 200


def test_no_api_keys_means_open(client: FlaskClient) -> None:
    assert client.get("/v1/models").status_code == 200
