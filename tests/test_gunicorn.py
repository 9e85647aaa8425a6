"""The real server: gunicorn with the shipped config and the committed artifacts, over loopback HTTP."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from benchmarks.balance import established
from tests.conftest import COMMITTED_ARTIFACTS, booted_workers, gunicorn_process, gunicorn_server


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with gunicorn_server(COMMITTED_ARTIFACTS, WORKERS="2") as base:
        yield base


def test_every_endpoint_over_http(server: str) -> None:
    assert requests.get(f"{server}/healthz", timeout=5).json() == {"status": "ok"}
    models = requests.get(f"{server}/v1/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == ["char-lstm", "char-lstm@1"]

    nxt = requests.post(f"{server}/v1/next-token", json={"text": "To be, or not to b", "top_k": 3}, timeout=10)
    assert nxt.status_code == 200 and nxt.headers["Content-Type"] == "application/json"
    assert nxt.json()["candidates"][0]["token"] == "e"  # the trained model knows its Hamlet

    gen = requests.post(
        f"{server}/v1/generate", json={"prompt": "KING", "max_tokens": 40, "seed": 1, "n": 2}, timeout=30
    ).json()
    assert [len(c["text"]) for c in gen["choices"]] == [40, 40]

    score = requests.post(
        f"{server}/v1/score", json={"texts": ["Shall I compare thee"], "include_tokens": True}, timeout=10
    )
    result = score.json()["results"][0]
    assert result["logprob"] == pytest.approx(math.fsum(t["logprob"] for t in result["tokens"]))
    assert result["bits_per_char"] < 4

    label = requests.post(f"{server}/v1/classify", json={"texts": ["My liege, the French are landed."]}, timeout=10)
    assert label.status_code == 200 and label.json()["results"][0]["label"] in models["data"][0]["classifier"]["labels"]


def test_errors_over_http(server: str) -> None:
    bad = requests.post(
        f"{server}/v1/next-token", data=b"\xff\xfe", headers={"Content-Type": "application/json"}, timeout=5
    )
    assert bad.status_code == 400 and "error" in bad.json()
    big = requests.post(
        f"{server}/v1/score", data=b"x" * (2 << 20), headers={"Content-Type": "application/json"}, timeout=10
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert requests.get(f"{server}/readyz", timeout=5).status_code == 200  # still up


def test_a_body_far_over_the_limit_sent_in_full_gets_the_413_envelope(server: str) -> None:
    """urllib sends the whole body before it reads the answer: the server must read and discard it
    (it answered without reading, and closing a socket with unread data resets the connection)."""
    body = b"x" * (20 << 20)
    request = urllib.request.Request(f"{server}/v1/score", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=30)
    assert answer.value.code == 413
    assert json.loads(answer.value.read())["error"]["code"] == "request_too_large"
    # The same over one keep-alive connection, then an ordinary request on it.
    with requests.Session() as session:
        big = session.post(f"{server}/v1/score", data=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        assert session.get(f"{server}/readyz", timeout=5).status_code == 200


def test_a_burst_of_keep_alive_connections_is_spread_over_the_workers(tiny_artifacts: Path) -> None:
    """Without balancing, all 8 often landed on one worker (`python -m benchmarks.balance --off`)."""
    with gunicorn_process(tiny_artifacts, WORKERS="2") as (proc, base):
        port = int(base.rsplit(":", 1)[1])
        workers = [psutil.Process(pid) for pid in booted_workers(proc.pid, 2)]
        for _ in range(5):
            sessions = [requests.Session() for _ in range(8)]
            with ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(lambda s: s.get(f"{base}/healthz", timeout=10).status_code, sessions))
            assert statuses == [200] * 8
            counts = sorted(established(worker, port) for worker in workers)
            assert sum(counts) == 8 and counts[0] >= 3, counts
            for session in sessions:
                session.close()
            deadline = time.monotonic() + 10
            while any(established(worker, port) for worker in workers):  # the next burst starts from zero
                assert time.monotonic() < deadline, "closed connections stayed open on the server"
                time.sleep(0.05)
