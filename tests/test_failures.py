"""Failure behaviour of the real server and of training, each shown on loopback with bounded work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from benchmarks.servers import start_gunicorn, stop
from tests.conftest import (
    REPO,
    TINY_TRAIN_ARGS,
    booted_workers,
    children,
    gunicorn_process,
    wait_ready,
)


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


# --------------------------------------------------------------------------- bad artifacts at start


@pytest.mark.parametrize("damage", ["tamper", "truncate", "missing"])
def test_bad_artifacts_stop_start_up_with_one_clear_line(tmp_path: Path, tiny_artifacts: Path, damage: str) -> None:
    artifacts = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, artifacts)
    weights = artifacts / "lm" / "model.safetensors"
    if damage == "tamper":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        expected = "lm/model.safetensors: SHA-256 mismatch"
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
        expected = "lm/model.safetensors: SHA-256 mismatch"
    else:
        shutil.rmtree(artifacts)
        expected = "manifest.json: missing"
    proc, _ = start_gunicorn(artifacts)
    proc.wait(timeout=60)
    output = stop(proc)
    assert proc.returncode not in (0, None)
    refusals = [line for line in output.splitlines() if "refusing to start" in line]
    assert len(refusals) == 1, output
    line = json.loads(refusals[0])
    assert line["level"] == "CRITICAL" and expected in line["message"]
    assert "Traceback" not in output


# --------------------------------------------------------------------------- a worker killed under load


def test_worker_killed_under_load_is_replaced(tiny_artifacts: Path) -> None:
    with gunicorn_process(tiny_artifacts, WORKERS="2", THREADS="2") as (proc, base):
        master = proc.pid
        workers = booted_workers(master, 2)
        assert len(workers) == 2
        session = requests.Session()
        stop = threading.Event()
        failures: list[str] = []
        successes = [0]

        def hammer() -> None:
            with requests.Session() as own:
                while not stop.is_set() and successes[0] < 5000:
                    try:
                        response = own.post(f"{base}/v1/next-token", json={"text": "abc"}, timeout=10)
                        successes[0] += response.status_code == 200
                    except requests.RequestException as exc:
                        failures.append(type(exc).__name__)

        with ThreadPoolExecutor(4) as pool:
            try:
                for _ in range(4):
                    pool.submit(hammer)
                time.sleep(0.5)
                os.kill(workers[0], signal.SIGKILL)
                deadline = time.monotonic() + 30
                while sorted(children(master)) == sorted(workers) or len(children(master)) < 2:
                    assert time.monotonic() < deadline, (
                        f"the master did not replace the worker: {children(master)}, {workers}"
                    )
                    time.sleep(0.1)
            finally:
                stop.set()  # the hammers must end even when an assertion fails, or the pool never exits
        assert len(failures) <= 4, failures  # at most the requests that were on the killed worker
        replacement = set(children(master)) - set(workers)
        assert len(replacement) == 1 and workers[1] in children(master)
        results = [session.post(f"{base}/v1/score", json={"texts": ["ok"]}, timeout=10).status_code for _ in range(40)]
        assert results == [200] * 40
        assert session.get(f"{base}/readyz", timeout=5).status_code == 200


# --------------------------------------------------------------------------- SIGTERM during a stream


def test_sigterm_lets_a_stream_finish_and_refuses_new_work(tiny_artifacts: Path) -> None:
    cap = 20_000
    proc, base = start_gunicorn(tiny_artifacts, WORKERS="1", MAX_TOKENS=str(cap), MAX_TOTAL_TOKENS=str(cap))
    try:
        wait_ready(proc, base)
        stream = requests.post(
            f"{base}/v1/generate",
            json={"prompt": "a", "max_tokens": cap, "seed": 1, "stream": True},
            stream=True,
            timeout=60,
        )
        lines = stream.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{base}/healthz", timeout=2)  # the listener is closed: no new work
        events = [first, *(line for line in lines if line)]
        assert events[-1] == b"data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        text = "".join(c["text"] for chunk in chunks for c in chunk["choices"])
        assert len(text) == cap
        assert chunks[-1]["usage"]["completion_tokens"] == cap
        proc.wait(timeout=60)
        assert proc.returncode == 0
    finally:
        stop(proc)


# --------------------------------------------------------------------------- interrupted training


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_training_leaves_artifacts_byte_identical(
    tmp_path: Path, tiny_corpus: Path, tiny_artifacts: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = [sys.executable, "-m", "training.run", "--corpus", str(tiny_corpus), "--out", str(out), *TINY_TRAIN_ARGS]
    proc = subprocess.Popen(
        [*args, "--max-steps", "1000000", "--patience", "1000000"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As from a shell: SIGINT at its default, whatever this test process inherited (an ignored SIGINT
        # would be inherited, and the training would then never see Ctrl-C).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until the optimizer loop runs
        if line.startswith("step "):
            break
    proc.send_signal(sig)
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
        pytest.fail(f"training did not stop within 120 s of {sig.name}; its output:\n{rest[-2000:]}")
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    if sig == signal.SIGINT:
        assert "previous artifacts are untouched" in rest
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]


# --------------------------------------------------------------------------- soak


def test_soak_mixed_requests_no_errors_flat_memory(tiny_artifacts: Path) -> None:
    total, concurrency = 3000, 8
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("/v1/next-token", {"text": "To be or not", "top_k": 5}),
        ("/v1/generate", {"prompt": "a", "max_tokens": 20, "n": 2}),
        ("/v1/score", {"texts": ["one", "two texts"], "include_tokens": True}),
        ("/v1/classify", {"texts": ["Hark!"]}),
        ("/v1/completions", {"model": "char-lstm", "prompt": "b", "max_tokens": 8, "logprobs": 2}),
    ]
    with gunicorn_process(tiny_artifacts, WORKERS="2", THREADS="4") as (proc, base):
        master = proc.pid
        workers = booted_workers(master, 2)
        warm = [requests.post(f"{base}{p}", json=b, timeout=10).status_code for p, b in bodies * 20]
        assert set(warm) == {200}
        first = {pid: rss_kib(pid) for pid in workers}

        def one(i: int) -> int:
            path, body = bodies[i % len(bodies)]
            return requests.post(f"{base}{path}", json=body, timeout=30).status_code

        with ThreadPoolExecutor(concurrency) as pool:
            statuses = list(pool.map(one, range(total)))
        last = {pid: rss_kib(pid) for pid in workers}
        assert sorted(children(master)) == sorted(workers)  # no worker died or was recycled
    print(f"\nsoak: {total} requests at concurrency {concurrency}; worker RSS KiB first {first} last {last}")
    assert statuses == [200] * total
    for pid in workers:
        assert last[pid] - first[pid] < 40 * 1024, (first, last)  # flat: well under 40 MiB of growth
