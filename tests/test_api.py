"""Endpoint contracts through the Flask test client, on the tiny artifact set."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.api.model_cards import model_entries
from service.models.repository import SINGLE_MODEL as LM_ID

pytestmark = pytest.mark.unit  # no server: `pytest -m unit` runs these in about a minute

SERVED = f"{LM_ID}@1"  # the id responses give: the model and the version that answered


def post(client: FlaskClient, path: str, body: Any) -> tuple[int, Any]:
    response = client.post(path, json=body)
    return response.status_code, response.get_json()


def assert_error(response_status: int, body: Any, status: int, param: str | None = None) -> None:
    assert response_status == status, body
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param


# --------------------------------------------------------------------------- health and models


def test_healthz_and_readyz(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert len(ready.get_json()["manifest_sha256"]) == 64


def test_readyz_is_503_until_models_are_loaded(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app.extensions["models"].repository, "_models", {})
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    status, body = post(client, "/v1/next-token", {"text": "a"})
    assert_error(status, body, 503)


def test_models_list_has_openai_shape_and_metadata(client: FlaskClient) -> None:
    body = client.get("/v1/models").get_json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert list(by_id) == [LM_ID, SERVED]  # the model (its serving version), then each loaded version
    model_only = {"versions": [1], "traffic": {"1": 1.0}, "shadow": None, "refused_versions": []}
    assert by_id[LM_ID] | {"id": SERVED} == by_id[SERVED] | model_only
    assert by_id[SERVED]["traffic_weight"] == 1.0
    for card in body["data"]:
        assert card["object"] == "model"
        assert isinstance(card["created"], int) and card["created"] > 1_700_000_000
        assert card["owned_by"]
        assert (card["root"], card["version"], card["serving"], card["default"]) == (LM_ID, 1, True, True)
        assert len(card["manifest_sha256"]) == 64 and card["memory_bytes"] > 0
        for network in (card["lm"], card["classifier"]):
            assert network["parameters"] > 0
            assert len(network["artifact_sha256"]) == 64
        assert card["lm"]["vocab_size"] > 10
        assert card["lm"]["metrics"]["test_bpc"] > 0
        assert card["classifier"]["labels"] == ["comedies", "tragedies"]
        assert 0 <= card["classifier"]["metrics"]["mlp"]["accuracy"] <= 1


# --------------------------------------------------------------------------- next-token


def test_models_created_is_the_manifests_utc_time_in_any_time_zone(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    repository = app.extensions["models"].repository
    stamp = repository.serving(LM_ID).engine.models.manifest["created"]  # e.g. "2026-12-04T13:54:22Z"
    expected = int(datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())
    for zone in ("UTC", "America/New_York", "Asia/Kolkata"):
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        assert {card["created"] for card in model_entries(repository)} == {expected}
    monkeypatch.undo()
    time.tzset()


def test_next_token_candidates_are_sorted_and_consistent(client: FlaskClient) -> None:
    status, body = post(client, "/v1/next-token", {"text": "To be, or not to b", "top_k": 7})
    assert status == 200
    assert body["model"] == SERVED
    candidates = body["candidates"]
    assert len(candidates) == 7
    probs = [c["prob"] for c in candidates]
    assert probs == sorted(probs, reverse=True)
    for c in candidates:
        assert len(c["token"]) == 1
        assert c["prob"] == pytest.approx(math.exp(c["logprob"]), rel=1e-12)
    assert body["entropy_bits"] > 0


def test_next_token_full_distribution_sums_to_one(client: FlaskClient) -> None:
    vocab = client.get("/v1/models").get_json()["data"][0]["lm"]["vocab_size"]
    status, body = post(client, "/v1/next-token", {"text": "", "top_k": 1000})
    assert status == 200
    assert len(body["candidates"]) == vocab  # capped at the vocabulary
    total = sum(c["prob"] for c in body["candidates"])
    assert total == pytest.approx(1.0, abs=1e-9)
    entropy = -sum(c["prob"] * math.log2(c["prob"]) for c in body["candidates"])
    assert body["entropy_bits"] == pytest.approx(entropy, rel=1e-6)


def test_next_token_default_top_k_is_5(client: FlaskClient) -> None:
    status, body = post(client, "/v1/next-token", {"text": "ab"})
    assert status == 200 and len(body["candidates"]) == 5


# --------------------------------------------------------------------------- generate


def test_generate_shape_and_usage(client: FlaskClient) -> None:
    status, body = post(client, "/v1/generate", {"prompt": "HAMLET", "max_tokens": 12, "seed": 3, "n": 2})
    assert status == 200
    assert body["model"] == SERVED
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert len(choice["text"]) == 12
        assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 24, "total_tokens": 30}


def test_same_seed_same_text(client: FlaskClient) -> None:
    request = {"prompt": "Good morrow", "max_tokens": 30, "temperature": 1.2, "top_p": 0.95, "seed": 11, "n": 3}
    first = post(client, "/v1/generate", request)[1]
    second = post(client, "/v1/generate", request)[1]
    assert first["choices"] == second["choices"]
    # choice i of seed s is choice 0 of seed s + i
    single = post(client, "/v1/generate", {**request, "n": 1, "seed": 12})[1]
    assert single["choices"][0]["text"] == first["choices"][1]["text"]


def test_different_seeds_differ(client: FlaskClient) -> None:
    texts = {
        post(client, "/v1/generate", {"prompt": "", "max_tokens": 40, "seed": seed})[1]["choices"][0]["text"]
        for seed in range(4)
    }
    assert len(texts) > 1


def test_greedy_first_character_is_next_token_top1(client: FlaskClient) -> None:
    for prompt in ["", "What, ho", "O Romeo, Romeo! wherefore art thou"]:
        top1 = post(client, "/v1/next-token", {"text": prompt, "top_k": 1})[1]["candidates"][0]["token"]
        body = post(client, "/v1/generate", {"prompt": prompt, "max_tokens": 5, "temperature": 0})[1]
        assert body["choices"][0]["text"][0] == top1


def test_greedy_ignores_seed_and_top_k(client: FlaskClient) -> None:
    a = post(client, "/v1/generate", {"prompt": "Sir", "max_tokens": 20, "temperature": 0, "seed": 1})[1]
    b = post(client, "/v1/generate", {"prompt": "Sir", "max_tokens": 20, "temperature": 0, "top_k": 3})[1]
    assert a["choices"] == b["choices"]


def test_top_k_1_sampling_equals_greedy(client: FlaskClient) -> None:
    greedy = post(client, "/v1/generate", {"prompt": "Sir", "max_tokens": 20, "temperature": 0})[1]
    sampled = post(client, "/v1/generate", {"prompt": "Sir", "max_tokens": 20, "top_k": 1, "seed": 5})[1]
    assert greedy["choices"] == sampled["choices"]


@pytest.mark.parametrize(
    "extreme", [{"top_p": 2.2e-311}, {"top_p": 1e-30}, {"temperature": 1e-300}, {"temperature": 5e-324}]
)
def test_vanishing_top_p_or_temperature_is_greedy(client: FlaskClient, extreme: dict[str, float]) -> None:
    """Found by the fuzzer: a top_p or temperature below float32's range once dropped every character (a 500)."""
    greedy = post(client, "/v1/generate", {"prompt": "Sir", "max_tokens": 20, "temperature": 0})[1]
    status, body = post(client, "/v1/generate", {"prompt": "Sir", "max_tokens": 20, "seed": 3, **extreme})
    assert status == 200, body
    assert body["choices"] == greedy["choices"]


def test_stop_sequence_is_honoured_and_not_returned(client: FlaskClient) -> None:
    greedy = post(client, "/v1/generate", {"prompt": "", "max_tokens": 40, "temperature": 0})[1]
    full = greedy["choices"][0]["text"]
    stop = full[10:13]  # some text the greedy output is known to contain
    body = post(client, "/v1/generate", {"prompt": "", "max_tokens": 40, "temperature": 0, "stop": [stop, "\u2603"]})[1]
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == full[: full.index(stop)]
    assert stop not in choice["text"]
    assert body["usage"]["completion_tokens"] == full.index(stop) + len(stop)


def test_stop_as_single_string(client: FlaskClient) -> None:
    status, body = post(client, "/v1/generate", {"prompt": "a", "max_tokens": 20, "stop": "zzzz", "seed": 1})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"


# --------------------------------------------------------------------------- score


def test_score_sums_tokens_to_total(client: FlaskClient) -> None:
    texts = ["Now is the winter of our discontent", "x", "Émoji 🙂 and 中文 score too"]
    status, body = post(client, "/v1/score", {"texts": texts, "include_tokens": True})
    assert status == 200
    assert body["model"] == SERVED
    for text, result in zip(texts, body["results"], strict=True):
        assert result["text"] == text
        assert result["n_chars"] == len(text)
        assert "".join(t["token"] for t in result["tokens"]) == text
        assert result["logprob"] == pytest.approx(math.fsum(t["logprob"] for t in result["tokens"]), abs=1e-9)
        assert all(t["logprob"] <= 0 for t in result["tokens"])
        assert result["bits_per_char"] == pytest.approx(-result["logprob"] / len(text) / math.log(2))
        assert result["perplexity"] == pytest.approx(math.exp(-result["logprob"] / len(text)))


def test_score_without_tokens_omits_them(client: FlaskClient) -> None:
    body = post(client, "/v1/score", {"texts": ["abc"]})[1]
    assert "tokens" not in body["results"][0]


def test_score_first_token_matches_next_token_from_empty(client: FlaskClient) -> None:
    dist = post(client, "/v1/next-token", {"text": "", "top_k": 1000})[1]["candidates"]
    first = post(client, "/v1/score", {"texts": ["T"], "include_tokens": True})[1]["results"][0]["tokens"][0]
    expected = next(c["logprob"] for c in dist if c["token"] == "T")
    assert first["logprob"] == pytest.approx(expected, abs=1e-6)


def test_score_batch_equals_single(client: FlaskClient) -> None:
    texts = ["Friends, Romans, countrymen", "lend me your ears"]
    batch = post(client, "/v1/score", {"texts": texts})[1]["results"]
    for text, result in zip(texts, batch, strict=True):
        single = post(client, "/v1/score", {"texts": [text]})[1]["results"][0]
        assert result["logprob"] == pytest.approx(single["logprob"], abs=1e-5)


def test_score_conditional_chain_rule(client: FlaskClient) -> None:
    """The logprob of the last character equals log P(next = c | prefix) from next-token."""
    text = "The lady doth protest"
    last = post(client, "/v1/score", {"texts": [text], "include_tokens": True})[1]["results"][0]["tokens"][-1]
    dist = post(client, "/v1/next-token", {"text": text[:-1], "top_k": 1000})[1]["candidates"]
    assert last["logprob"] == pytest.approx(next(c["logprob"] for c in dist if c["token"] == "t"), abs=1e-5)


# --------------------------------------------------------------------------- classify


def test_classify_probabilities_sum_to_one(client: FlaskClient) -> None:
    status, body = post(client, "/v1/classify", {"texts": ["O, I die, Horatio!", "Come, woo me, woo me"]})
    assert status == 200
    assert body["model"] == SERVED
    assert len(body["results"]) == 2
    for result in body["results"]:
        assert set(result["probabilities"]) == {"comedies", "tragedies"}
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
        assert result["label"] == max(result["probabilities"], key=result["probabilities"].get)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/next-token", {}, 400, "text"),
        ("/v1/next-token", {"text": "a", "extra": 1}, 400, "extra"),
        ("/v1/next-token", {"text": 5}, 400, "text"),
        ("/v1/next-token", {"text": "a", "top_k": "5"}, 400, "top_k"),
        ("/v1/next-token", {"text": "a", "top_k": 0}, 400, "top_k"),
        ("/v1/next-token", {"text": "a", "top_k": 10**6}, 400, "top_k"),
        ("/v1/next-token", {"text": "a", "top_k": True}, 400, "top_k"),
        ("/v1/next-token", {"text": "a" * 301}, 400, "text"),
        ("/v1/next-token", [], 400, None),
        ("/v1/next-token", "text", 400, None),
        ("/v1/generate", {"max_tokens": 5}, 400, "prompt"),
        ("/v1/generate", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/generate", {"prompt": "a", "max_tokens": 51}, 400, "max_tokens"),
        ("/v1/generate", {"prompt": "a", "max_tokens": -3}, 400, "max_tokens"),
        ("/v1/generate", {"prompt": "a", "max_tokens": 2**70}, 400, "max_tokens"),
        ("/v1/generate", {"prompt": "a", "temperature": -0.1}, 400, "temperature"),
        ("/v1/generate", {"prompt": "a", "top_p": 0}, 400, "top_p"),
        ("/v1/generate", {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
        ("/v1/generate", {"prompt": "a", "top_k": 0}, 400, "top_k"),
        ("/v1/generate", {"prompt": "a", "n": 0}, 400, "n"),
        ("/v1/generate", {"prompt": "a", "n": 4}, 400, "n"),
        ("/v1/generate", {"prompt": "a", "seed": -1}, 400, "seed"),
        ("/v1/generate", {"prompt": "a", "seed": 1.5}, 400, "seed"),
        ("/v1/generate", {"prompt": "a", "stop": ""}, 400, "stop"),
        ("/v1/generate", {"prompt": "a", "stop": []}, 400, "stop"),
        ("/v1/generate", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("/v1/generate", {"prompt": "a", "stop": [3]}, 400, None),
        ("/v1/score", {"texts": []}, 400, "texts"),
        ("/v1/score", {"texts": [""]}, 400, None),
        ("/v1/score", {"texts": "abc"}, 400, "texts"),
        ("/v1/score", {"texts": ["a"] * 5}, 400, "texts"),
        ("/v1/score", {"texts": ["a" * 301]}, 400, "texts"),
        ("/v1/score", {"texts": ["a"], "include_tokens": "yes"}, 400, "include_tokens"),
        ("/v1/classify", {"texts": []}, 400, "texts"),
        ("/v1/classify", {"text": ["a"]}, 400, None),
    ],
)
def test_client_mistakes_get_4xx_envelope(
    client: FlaskClient, path: str, body: Any, status: int, param: str | None
) -> None:
    assert_error(*post(client, path, body), status, param)


@pytest.mark.parametrize("raw", ["{bad json", '{"text": NaN}', '{"prompt": "a", "temperature": Infinity}', ""])
def test_invalid_json_is_400(client: FlaskClient, raw: str) -> None:
    path = "/v1/generate" if "prompt" in raw else "/v1/next-token"
    response = client.post(path, data=raw, content_type="application/json")
    assert_error(response.status_code, response.get_json(), 400)


def test_nan_literal_is_rejected_for_floats(client: FlaskClient) -> None:
    response = client.post("/v1/generate", data='{"prompt": "a", "top_p": NaN}', content_type="application/json")
    assert_error(response.status_code, response.get_json(), 400)


def test_wrong_content_type_is_415(client: FlaskClient) -> None:
    response = client.post("/v1/next-token", data='{"text": "a"}', content_type="text/plain")
    assert_error(response.status_code, response.get_json(), 415)


def test_body_too_large_is_413(client: FlaskClient) -> None:
    response = client.post("/v1/score", data='{"texts": ["' + "a" * (1 << 20) + '"]}', content_type="application/json")
    assert_error(response.status_code, response.get_json(), 413)


def test_unknown_route_and_wrong_method(client: FlaskClient) -> None:
    response = client.get("/v1/nothing")
    assert_error(response.status_code, response.get_json(), 404)
    response = client.get("/v1/generate")
    assert_error(response.status_code, response.get_json(), 405)


def test_lone_surrogate_is_a_client_error_or_scored(client: FlaskClient) -> None:
    response = client.post("/v1/score", data='{"texts": ["a\\ud800b"]}', content_type="application/json")
    assert response.status_code in (200, 400)
    assert response.is_json
