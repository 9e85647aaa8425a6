"""Request ids, JSON logs, response headers and Prometheus metrics."""

from __future__ import annotations

import json
import logging
import re
import uuid
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from benchmarks.servers import metric_total
from service.api.app import create_app
from service.api.observability import RequestIdFilter, json_formatter
from service.settings import Settings

pytestmark = pytest.mark.unit  # no server: `pytest -m unit` runs these in about a minute


def test_request_id_is_echoed_or_generated(client: FlaskClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    generated = client.get("/healthz").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    hostile = client.get("/healthz", headers={"X-Request-ID": "x" * 500}).headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", hostile)  # an unusable id is replaced, not reflected


def test_errors_carry_request_id_and_security_headers(client: FlaskClient) -> None:
    response = client.post("/v1/score", json={"texts": []}, headers={"X-Request-ID": "req-1"})
    assert response.status_code == 400
    assert response.headers["X-Request-ID"] == "req-1"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert "Access-Control-Allow-Origin" not in response.headers  # CORS is off


def test_access_log_is_json_with_request_id_and_no_body(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    secret = "a very private passage"
    with caplog.at_level(logging.INFO, logger="service.access"):
        client.post("/v1/score", json={"texts": [secret]}, headers={"X-Request-ID": "log-me"})
    [record] = [r for r in caplog.records if r.name == "service.access"]
    RequestIdFilter().filter(record)
    line = json.loads(json_formatter().format(record))
    assert line["level"] == "INFO" and line["route"] == "/v1/score" and line["status"] == 200
    assert line["duration_ms"] > 0
    assert secret not in json.dumps(line) and secret not in caplog.text


def test_metrics_count_requests_tokens_and_characters(client: FlaskClient) -> None:
    client.post("/v1/generate", json={"prompt": "a", "max_tokens": 7, "n": 2, "seed": 1})
    client.post("/v1/score", json={"texts": ["abcd"]})
    client.get("/nowhere")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    assert 'charlm_http_requests_total{method="POST",route="/v1/generate",status="200"}' in text
    assert 'route="<unmatched>",status="404"' in text
    assert "charlm_http_request_duration_seconds_bucket" in text
    model = 'model="char-lstm@1"'
    assert re.search(rf"^charlm_tokens_generated_total{{{model}}} \d+", text, re.M)
    assert re.search(rf"^charlm_chars_scored_total{{{model}}} \d+", text, re.M)
    assert re.search(rf"^charlm_model_load_seconds{{{model}}} [0-9.e-]+", text, re.M)
    assert re.search(rf"^charlm_model_memory_bytes{{{model}}} [0-9.e+]+", text, re.M)
    assert re.search(rf"^charlm_model_requests_total{{{model}}} [0-9.e+]+", text, re.M)
    assert "charlm_http_requests_in_flight" in text


def metric_value(text: str, name: str) -> float:
    return metric_total(text, name)


def test_metrics_show_decode_and_prompt_batch_sizes(client: FlaskClient) -> None:
    names = [
        "charlm_decode_batch_rows_count",
        "charlm_decode_batch_rows_sum",
        "charlm_prefill_batch_prompts_count",
        "charlm_prefill_batch_prompts_sum",
    ]
    before = client.get("/metrics").get_data(as_text=True)
    # New to this process, so not in the prefix cache, and shorter than PREFILL_CHUNK_CHARS (32), so
    # it is encoded in one piece.
    prompt = "a " + uuid.uuid4().hex[:16]
    response = client.post("/v1/generate", json={"prompt": prompt, "max_tokens": 7, "n": 3, "seed": 1})
    assert response.status_code == 200
    after = client.get("/metrics").get_data(as_text=True)
    steps, rows, batches, prompts = (metric_value(after, n) - metric_value(before, n) for n in names)
    assert (steps, rows, batches, prompts) == (7, 21, 1, 1)  # 7 steps of 3 rows; one prompt, encoded once
    assert 'charlm_decode_batch_rows_bucket{le="4.0"}' in after


def test_cors_only_when_configured(tiny_artifacts: Path) -> None:
    app = create_app(Settings(artifacts_dir=tiny_artifacts, cors_origins="https://app.example"))
    client = app.test_client()
    allowed = client.get("/v1/models", headers={"Origin": "https://app.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    other = client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
