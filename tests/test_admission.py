"""Admission of model requests: waiting in the worker's event loop (no thread), shed by the wait a request
can expect, per-request `timeout` and `priority`. A real gunicorn server on loopback with one request
thread, held by a stream the test controls; bounded in count and time, and no assertion on timing."""

from __future__ import annotations

import io
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from flask import Flask

from benchmarks.servers import metric_total
from service.server.admission import Throughput, request_options
from tests.conftest import gunicorn_server

LONG_STREAM = {"prompt": "KING.", "max_tokens": 20_000, "stream": True, "seed": 1}
ENV = {"WORKERS": "1", "THREADS": "1", "MAX_TOKENS": "20000", "MAX_TOTAL_TOKENS": "20000"}


@contextmanager
def thread_held(base: str) -> Iterator[None]:
    """The server's only request thread busy with a stream until the block ends (the client then goes away,
    which frees the thread at the stream's next write)."""
    port = int(base.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    payload = json.dumps(LONG_STREAM).encode()
    sock.sendall(
        b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    assert sock.recv(64).startswith(b"HTTP/1.1 200")
    try:
        yield
    finally:
        sock.close()


def metrics(base: str) -> str:
    return requests.get(f"{base}/metrics", timeout=5).text


def waiting(base: str, count: int) -> None:
    """Until `count` model requests wait in the queue (bounded)."""
    for _ in range(200):
        if metric_total(metrics(base), "charlm_requests_waiting") >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{count} requests never waited")


def test_a_request_past_its_timeout_leaves_the_queue_with_504_and_costs_no_compute(tiny_artifacts: Path) -> None:
    with gunicorn_server(tiny_artifacts, QUEUE_WAIT_SECONDS="60", **ENV) as base, thread_held(base):
        before = metric_total(metrics(base), "charlm_model_requests_total")
        answer = requests.post(f"{base}/v1/next-token", json={"text": "To be", "timeout": 1.5}, timeout=30)
        assert answer.status_code == 504
        assert answer.json()["error"]["code"] == "timeout" and answer.headers["Connection"] == "close"
        text = metrics(base)
        assert metric_total(text, 'charlm_requests_refused_total{reason="timeout"}') == 1
        assert metric_total(text, "charlm_model_requests_total") == before  # never reached the model
        assert requests.get(f"{base}/healthz", timeout=5).status_code == 200


def test_with_no_waiting_allowed_a_busy_worker_refuses_at_once_with_retry_after(
    tiny_artifacts: Path,
) -> None:
    with gunicorn_server(tiny_artifacts, QUEUE_WAIT_SECONDS="0", **ENV) as base, thread_held(base):
        answer = requests.post(f"{base}/v1/next-token", json={"text": "To be"}, timeout=30)
        assert answer.status_code == 503 and int(answer.headers["Retry-After"]) >= 1
        error = answer.json()["error"]
        assert error["type"] == "service_unavailable" and error["code"] == "overloaded"
        assert requests.get(f"{base}/readyz", timeout=5).status_code == 200


def test_interactive_requests_are_served_before_batch_ones(tiny_artifacts: Path) -> None:
    """A batch request queued first and an interactive one queued after it: the interactive one is
    answered first once the thread frees up."""
    order: list[str] = []
    lock = threading.Lock()

    def ask(priority: str) -> None:
        body = {"text": "To be", "priority": priority}
        answer = requests.post(f"{base}/v1/next-token", json=body, timeout=60)
        with lock:
            order.append(f"{priority} {answer.status_code}")

    with gunicorn_server(tiny_artifacts, QUEUE_WAIT_SECONDS="60", **ENV) as base:
        with thread_held(base):
            batch = threading.Thread(target=ask, args=("batch",))
            batch.start()
            waiting(base, 1)
            interactive = threading.Thread(target=ask, args=("interactive",))
            interactive.start()
            waiting(base, 2)
        batch.join(timeout=60)
        interactive.join(timeout=60)
    assert order == ["interactive 200", "batch 200"]


def test_requests_wait_in_the_loop_not_in_threads(tiny_artifacts: Path) -> None:
    """With one request thread taken, 20 more requests all wait (no thread each) and are all answered."""
    results: list[int] = []

    def ask(number: int) -> None:
        answer = requests.post(f"{base}/v1/next-token", json={"text": f"To be {number}"}, timeout=60)
        results.append(answer.status_code)

    with gunicorn_server(tiny_artifacts, QUEUE_WAIT_SECONDS="60", **ENV) as base:
        with thread_held(base):
            askers = [threading.Thread(target=ask, args=(n,)) for n in range(20)]
            for asker in askers:
                asker.start()
            waiting(base, 20)
        for asker in askers:
            asker.join(timeout=60)
    assert results == [200] * 20


def test_a_timeout_ends_a_running_generation_with_finish_reason_deadline(app: Flask) -> None:
    body: dict[str, Any] = {"prompt": "a", "max_tokens": 50, "timeout": 0.001, "seed": 1}
    response = app.test_client().post("/v1/generate", json=body)
    assert response.status_code == 200
    (choice,) = response.get_json()["choices"]
    assert choice["finish_reason"] == "deadline"


def test_timeout_and_priority_are_checked(app: Flask) -> None:
    client = app.test_client()
    for bad in ({"timeout": 0}, {"timeout": -1}, {"timeout": "soon"}, {"priority": "urgent"}):
        response = client.post("/v1/next-token", json={"text": "a", **bad})
        assert response.status_code == 400, bad
        assert response.get_json()["error"]["param"] in ("timeout", "priority")


def test_the_wait_estimate_follows_the_measured_rate() -> None:
    throughput = Throughput(cold_queue=64)
    assert throughput.expected_wait(64, 0.0) == 0.0  # nothing measured: a burst may wait up to cold_queue
    assert throughput.expected_wait(65, 0.0) == math.inf
    for n in range(100):  # 100 answers a second
        throughput.record(n / 100)
    assert throughput.expected_wait(50, 1.0) == pytest.approx(0.5, rel=0.05)
    assert throughput.expected_wait(50, 10.0) == 0.0  # long idle: measured afresh


def test_priority_and_timeout_are_read_from_the_body_and_anything_odd_is_ignored() -> None:
    def options(body: bytes, path: str = "/v1/generate") -> tuple[int, float | None]:
        request = SimpleNamespace(body=io.BytesIO(body), path=path)
        return request_options(request)  # type: ignore[arg-type]

    assert options(b'{"text": "a"}') == (0, None)
    assert options(b'{"text": "a", "priority": "batch", "timeout": 2}') == (1, 2.0)
    for odd in (b'{"priority": {}, "timeout": []}', b'{"timeout": true}', b"[1]", b"not json", b'{"timeout": -1}'):
        assert options(odd) == (0, None), odd
    # The Open Inference Protocol's parameters: Triton's priority (2 and above: batch), timeout in microseconds.
    infer = "/v2/models/m/infer"
    assert options(b'{"inputs": [], "parameters": {"priority": 2, "timeout": 250000}}', infer) == (1, 0.25)
    assert options(b'{"inputs": [], "parameters": {"priority": 1}}', infer) == (0, None)
    assert options(b'{"inputs": [], "parameters": {"priority": true, "timeout": 1.5}}', infer) == (0, None)
