"""The real server: gunicorn with the shipped config and the committed artifacts, over loopback HTTP."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import COMMITTED_ARTIFACTS, REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "WORKERS": "2",
        "ARTIFACTS_DIR": str(COMMITTED_ARTIFACTS),
    }
    gunicorn = Path(sys.executable).with_name("gunicorn")
    proc = subprocess.Popen(
        [str(gunicorn), "-c", "gunicorn.conf.py"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "gunicorn exited"
            try:
                if requests.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "gunicorn did not become ready within 60 s"
            time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_every_endpoint_over_http(server: str) -> None:
    assert requests.get(f"{server}/healthz", timeout=5).json() == {"status": "ok"}
    models = requests.get(f"{server}/v1/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == ["char-lstm", "mlp-classifier"]

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
    assert label.status_code == 200 and label.json()["results"][0]["label"] in models["data"][1]["labels"]


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
