"""The OpenAPI document against the app itself, limits, and hostile input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator

from service.api.openapi import openapi_path
from service.models.repository import SINGLE_MODEL as LM_ID
from tests.test_api import assert_error, post

pytestmark = pytest.mark.unit  # no server: `pytest -m unit` runs these in about a minute


@pytest.fixture(scope="module")
def spec(app: Flask) -> dict[str, Any]:
    body: dict[str, Any] = app.test_client().get("/openapi.json").get_json()
    return body


def validate(spec: dict[str, Any], path: str, method: str, status: int, body: Any) -> None:
    responses = spec["paths"][path][method]["responses"]
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    Draft202012Validator({**schema, "components": spec["components"]}).validate(body)


def test_every_route_is_in_the_spec(app: Flask, spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.")
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path, _ = openapi_path(rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            assert method.lower() in spec["paths"][path], f"{method} {path} is missing"


def test_spec_schemas_come_from_the_request_models(spec: dict[str, Any]) -> None:
    generate = spec["components"]["schemas"]["GenerateRequest"]
    assert generate["additionalProperties"] is False
    assert generate["properties"]["top_p"]["exclusiveMinimum"] == 0
    assert set(generate["required"]) == {"prompt"}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/healthz", None),
        ("get", "/readyz", None),
        ("get", "/v1/models", None),
        ("post", "/v1/next-token", {"text": "Hark", "top_k": 3}),
        ("post", "/v1/generate", {"prompt": "Hark", "max_tokens": 5, "n": 2, "seed": 1}),
        ("post", "/v1/score", {"texts": ["Hark", "ho"], "include_tokens": True}),
        ("post", "/v1/classify", {"texts": ["Hark"]}),
        ("post", "/v1/completions", {"model": LM_ID, "prompt": "Hark", "max_tokens": 3, "logprobs": 2, "echo": True}),
        ("post", "/v1/score", {"texts": []}),
        ("post", "/v1/completions", {"model": "nope", "prompt": "a"}),
    ],
)
def test_real_responses_validate_against_the_spec(
    client: FlaskClient, spec: dict[str, Any], method: str, path: str, body: Any
) -> None:
    response = client.open(path, method=method.upper(), json=body)
    validate(spec, path, method, response.status_code, response.get_json())


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/generate", {"prompt": "Hark", "max_tokens": 6, "n": 2, "seed": 1, "stream": True}),
        (
            "/v1/completions",
            {"model": LM_ID, "prompt": "Hark", "max_tokens": 4, "logprobs": 2, "echo": True, "stream": True,
             "stream_options": {"include_usage": True}},
        ),
    ],
)  # fmt: skip
def test_streamed_events_validate_against_the_spec(
    client: FlaskClient, spec: dict[str, Any], path: str, body: dict[str, Any]
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    event_schema = spec["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    chunk_schema = event_schema["properties"]["data"]["anyOf"][1]["contentSchema"]
    events = [e.removeprefix("data: ") for e in response.get_data(as_text=True).split("\n\n") if e]
    assert events[-1] == "[DONE]" and len(events) > 2
    validator = Draft202012Validator({**chunk_schema, "components": spec["components"]})
    for event in events[:-1]:
        validator.validate(json.loads(event))


def test_docs_page_is_self_contained(client: FlaskClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    for asset in ("/docs/swagger-ui.css", "/docs/swagger-ui-bundle.js", "/docs/init.js"):
        assert asset in page.get_data(as_text=True)
        response = client.get(asset)
        assert response.status_code == 200 and len(response.data) > 20
        response.close()
    assert client.get("/docs/../app.py").status_code == 404


# --------------------------------------------------------------------------- limits


def test_total_generation_is_capped(app: Flask) -> None:
    client = app.test_client()
    settings = app.extensions["models"].settings
    old, settings.max_total_tokens = settings.max_total_tokens, 60
    try:
        assert_error(*post(client, "/v1/generate", {"prompt": "a", "max_tokens": 31, "n": 2}), 400)
        assert post(client, "/v1/generate", {"prompt": "a", "max_tokens": 30, "n": 2})[0] == 200
        body = {"model": LM_ID, "prompt": ["a", "b"], "max_tokens": 20, "n": 1, "best_of": 2}
        assert_error(*post(client, "/v1/completions", body), 400)
    finally:
        settings.max_total_tokens = old


def test_deadline_ends_generation_with_documented_reason(app: Flask) -> None:
    client = app.test_client()
    settings = app.extensions["models"].settings
    old, settings.request_deadline_seconds = settings.request_deadline_seconds, 1e-9
    try:
        status, body = post(client, "/v1/generate", {"prompt": "a", "max_tokens": 50, "n": 2})
        assert status == 200
        assert [c["finish_reason"] for c in body["choices"]] == ["deadline", "deadline"]
        assert all(len(c["text"]) < 50 for c in body["choices"])
        events = client.post("/v1/completions", json={"model": LM_ID, "prompt": "a", "max_tokens": 50, "stream": True})
        assert '"finish_reason": "deadline"' in events.get_data(as_text=True)
    finally:
        settings.request_deadline_seconds = old


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "raw",
    [
        b'{"texts": ["\xff\xfe invalid utf-8"]}',
        b'{"texts": ["a\\ud800b"]}',  # a lone surrogate as a JSON escape
        b'{"texts": ["\\udc00"]}',
        b"[" * 10_000 + b"]" * 10_000,  # deeply nested
        b'{"texts": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"texts": ["a"], "include_tokens": NaN}',
        b'{"texts": ["a"], "include_tokens": 1e999}',
        b'{"texts": ["a"]} trailing',
        b"\x00\x01\x02",
        b'{"texts": ["a"], "texts": ["b"], "extra": {}}',
    ],
)
def test_hostile_bodies_get_4xx_or_an_answer(client: FlaskClient, raw: bytes) -> None:
    response = client.post("/v1/score", data=raw, content_type="application/json")
    assert response.status_code in (200, 400), response.get_data(as_text=True)
    assert response.is_json
    assert client.get("/readyz").status_code == 200


def test_nul_and_control_characters_are_scored(client: FlaskClient) -> None:
    text = "a\x00b\x07c\x1bd\u202e\ufeff"
    status, body = post(client, "/v1/score", {"texts": [text], "include_tokens": True})
    assert status == 200
    assert "".join(t["token"] for t in body["results"][0]["tokens"]) == text
    status, body = post(client, "/v1/next-token", {"text": "\x00" * 10})
    assert status == 200


def test_megabyte_string_is_413(client: FlaskClient) -> None:
    raw = json.dumps({"text": "a" * (1 << 20)}).encode()
    response = client.post("/v1/next-token", data=raw, content_type="application/json")
    assert_error(response.status_code, response.get_json(), 413)


@pytest.mark.parametrize("value", [-1, 0, 2**31, 2**63, 10**400, 1.5, "1", None, True])
def test_negative_huge_and_mistyped_numbers(client: FlaskClient, value: Any) -> None:
    raw = '{"prompt": "a", "max_tokens": ' + json.dumps(value) + "}"
    response = client.post("/v1/generate", data=raw, content_type="application/json")
    assert_error(response.status_code, response.get_json(), 400)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""])
def test_wrong_content_types(client: FlaskClient, content_type: str) -> None:
    response = client.post("/v1/score", data='{"texts": ["a"]}', content_type=content_type)
    assert_error(response.status_code, response.get_json(), 415)


def test_no_stack_traces_in_responses(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = app.extensions["models"].repository.serving(LM_ID).engine

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(engine, "classify", explode)
    response = app.test_client().post("/v1/classify", json={"texts": ["a"]})
    assert response.status_code == 500
    assert response.get_json() == {
        "error": {"message": "internal server error", "type": "server_error", "param": None, "code": "internal_error"}
    }
    assert b"secret" not in response.data and b"Traceback" not in response.data
