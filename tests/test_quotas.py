"""API keys with limits (service.api.quotas): requests per second, generated characters per minute,
concurrent requests and models per key, OpenAI's x-ratelimit-* headers, a key file read again when it
changes, and counts shared by the workers of a real server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from flask import Flask

from service.api.app import create_app
from service.api.quotas import KeyFileError, KeyRing, key_id, parse_key_file
from service.settings import Settings
from tests.conftest import gunicorn_server

SLOW, NARROW, WORDY, SINGLE, OPEN = "slow-key-1", "narrow-key", "wordy-key-1", "single-key", "open-key-1"
KEYS: list[dict[str, Any]] = [
    {"key": SLOW, "name": "slow", "requests_per_second": 2},
    {"key": NARROW, "models": ["another-model"]},
    {"key": WORDY, "chars_per_minute": 30},
    {"key": SINGLE, "concurrent": 1},
    {"key": OPEN},
]


def key_file(path: Path, keys: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"keys": keys}))
    return path


@pytest.fixture()
def app(tiny_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    monkeypatch.setattr(KeyRing, "RELOAD_SECONDS", 0.0)
    settings = Settings(artifacts_dir=tiny_artifacts, api_keys_file=key_file(tmp_path / "keys.json", KEYS),
                        quota_dir=tmp_path / "quotas", max_tokens=50)  # fmt: skip
    app = create_app(settings)
    yield app
    for mv in app.extensions["models"].repository.versions():
        mv.engine.close()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.unit
def test_the_key_file_is_checked() -> None:
    assert parse_key_file(json.dumps({"keys": KEYS}).encode())[0].requests_per_second == 2
    bad_files: list[Any] = [{"keys": [{"key": "short"}]}, {"keys": [{"key": "long-enough", "rps": 1}]},
                            {"keys": [{"key": "long-enough", "concurrent": 1.5}]}, {"keys": "x"}, []]  # fmt: skip
    for bad in bad_files:
        with pytest.raises(KeyFileError):
            parse_key_file(json.dumps(bad).encode())


@pytest.mark.unit
def test_requests_per_second_gives_429_with_the_headers(app: Flask) -> None:
    client = app.test_client()
    answers = [client.post("/v1/next-token", json={"text": "a"}, headers=auth(SLOW)) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
    assert answers[0].headers["x-ratelimit-remaining-requests"] == "1"
    assert answers[1].headers["x-ratelimit-remaining-requests"] == "0"
    refused = answers[2]
    assert int(refused.headers["Retry-After"]) >= 1 and refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert refused.get_json()["error"]["code"] == "rate_limit_exceeded"
    time.sleep(0.6)  # a second's rate refills half a second's worth: one request
    assert client.post("/v1/next-token", json={"text": "a"}, headers=auth(SLOW)).status_code == 200
    assert client.post("/v1/next-token", json={"text": "a"}, headers=auth(OPEN)).status_code == 200  # no limits
    assert client.post("/v1/next-token", json={"text": "a"}).status_code == 401


@pytest.mark.unit
def test_a_key_limited_to_other_models_gets_403(app: Flask) -> None:
    answer = app.test_client().post("/v1/next-token", json={"text": "a"}, headers=auth(NARROW))
    assert answer.status_code == 403 and answer.get_json()["error"]["code"] == "model_not_allowed"


@pytest.mark.unit
def test_generated_characters_count_against_the_key(app: Flask) -> None:
    client = app.test_client()
    body = {"prompt": "ROMEO:", "max_tokens": 20, "temperature": 0}

    def generate() -> Any:
        answer = client.post("/v1/generate", json=body, headers=auth(WORDY))
        answer.close()  # as a WSGI server closes every response: the key's counters are settled then
        return answer

    first = generate()
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-tokens"] == "30"
    second = generate()  # 10 characters left: admitted
    assert second.status_code == 200 and second.headers["x-ratelimit-remaining-tokens"] == "10"
    third = generate()
    assert third.status_code == 429 and third.get_json()["error"]["type"] == "tokens"


@pytest.mark.unit
def test_concurrent_requests_count_until_the_stream_closes(app: Flask) -> None:
    client = app.test_client()
    body = {"prompt": "ROMEO:", "max_tokens": 30, "stream": True}
    streaming = client.post("/v1/generate", json=body, headers=auth(SINGLE), buffered=False)
    assert streaming.status_code == 200
    assert client.post("/v1/next-token", json={"text": "a"}, headers=auth(SINGLE)).status_code == 429
    streaming.get_data()
    streaming.close()
    assert client.post("/v1/next-token", json={"text": "a"}, headers=auth(SINGLE)).status_code == 200


@pytest.mark.unit
def test_the_key_file_is_read_again_when_it_changes(app: Flask, tmp_path: Path) -> None:
    client = app.test_client()
    assert client.post("/v1/next-token", json={"text": "a"}, headers=auth("brand-new-key")).status_code == 401
    key_file(tmp_path / "keys.json", [*KEYS, {"key": "brand-new-key"}])
    assert client.post("/v1/next-token", json={"text": "a"}, headers=auth("brand-new-key")).status_code == 200
    (tmp_path / "keys.json").write_text("{broken")  # a bad file keeps the keys read before
    assert client.post("/v1/next-token", json={"text": "a"}, headers=auth("brand-new-key")).status_code == 200
    metrics = client.get("/metrics").get_data(as_text=True)
    assert SLOW not in metrics and "brand-new-key" not in metrics


def test_two_workers_do_not_double_a_quota(tiny_artifacts: Path, tmp_path: Path) -> None:
    keys = key_file(tmp_path / "keys.json", [{"key": SLOW, "requests_per_second": 4}, {"key": WORDY}])
    with gunicorn_server(tiny_artifacts, WORKERS="2", API_KEYS_FILE=str(keys)) as base:

        def ask(_: int) -> int:
            with requests.Session() as session:  # a connection of its own: any worker may take it
                return session.post(
                    f"{base}/v1/next-token", json={"text": "a"}, headers=auth(SLOW), timeout=30
                ).status_code

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(ask, range(60)))
        elapsed = time.monotonic() - started
        assert set(statuses) <= {200, 429} and statuses.count(429) > 0
        assert statuses.count(200) <= 4 + 4 * elapsed + 1, (statuses.count(200), elapsed)  # a burst, then the rate
        metrics = requests.get(f"{base}/metrics", timeout=10).text
        assert f'charlm_quota_refusals_total{{key="{key_id(SLOW)}",limit="requests"}}' in metrics

        client = openai.OpenAI(base_url=f"{base}/v1", api_key=WORDY, max_retries=0)
        raw = client.completions.with_raw_response.create(model="char-lstm", prompt="ROMEO:", max_tokens=5)
        assert raw.http_response.status_code == 200 and "x-ratelimit-limit-tokens" not in raw.headers
        slow = openai.OpenAI(base_url=f"{base}/v1", api_key=SLOW, max_retries=0)
        time.sleep(1.0)
        raw = slow.completions.with_raw_response.create(model="char-lstm", prompt="ROMEO:", max_tokens=5)
        assert raw.headers["x-ratelimit-limit-requests"] == "4" and "x-ratelimit-remaining-requests" in raw.headers
