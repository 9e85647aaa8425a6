"""Faults in shared state and the lifecycle, against a real gunicorn server on loopback: a /dev/shm too
small for the shared tables, and SIGTERM with streams in flight. Bounded in count and time."""

from __future__ import annotations

import json
import random
import signal
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from benchmarks.servers import metric_total, stop
from tests.conftest import booted_workers, children, gunicorn_process
from tests.test_shared_cache import small_tmpfs


def distinct_prompts(count: int, length: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    letters = string.ascii_letters + " ,.;\n"
    return ["".join(rng.choice(letters) for _ in range(length)) for _ in range(count)]


def test_a_small_dev_shm_costs_sharing_not_workers(tiny_artifacts: Path, tmp_path: Path) -> None:
    """2,000 distinct 300-character prompts from 8 clients with the shared tables on a 4 MiB tmpfs (less than
    the 16 MiB a version asks for): every request answered, no worker lost."""
    with (
        small_tmpfs(tmp_path, "4m") as shm,
        gunicorn_process(tiny_artifacts, WORKERS="2", SHARED_CACHE_DIR=str(shm), SHARED_PREFIX_CACHE_MB="16") as (
            proc,
            base,
        ),
    ):
        workers = booted_workers(proc.pid, 2)
        prompts = distinct_prompts(2000, 300)

        def client(share: list[str]) -> list[int]:
            with requests.Session() as session:
                return [
                    session.post(f"{base}/v1/next-token", json={"text": text}, timeout=30).status_code for text in share
                ]

        with ThreadPoolExecutor(8) as pool:
            statuses = [s for part in pool.map(client, [prompts[i::8] for i in range(8)]) for s in part]
        assert statuses == [200] * 2000
        assert sorted(children(proc.pid)) == sorted(workers)  # no worker died (a SIGBUS) and was replaced
        text = requests.get(f"{base}/metrics", timeout=5).text
        reserved = metric_total(text, "charlm_prefix_cache_shared_bytes")
        assert 0 < reserved <= 4 << 20  # the table took what the filesystem had, and says so
        log = stop(proc)
    assert "Worker (pid" not in log and "SIGBUS" not in log, log[-2000:]
    assert "reserved of the" in log  # the smaller table is logged


def test_sigterm_ends_every_stream_cleanly_before_the_workers_are_stopped(tiny_artifacts: Path) -> None:
    """64 streams longer than the graceful timeout: SIGTERM ends each with a last chunk whose finish_reason
    is "shutdown" and `[DONE]`, none cut mid-body, and the server exits before it would kill its workers."""
    cap = 1_000_000
    env = {"WORKERS": "2", "THREADS": "40", "GRACEFUL_TIMEOUT": "4", "MAX_TOKENS": str(cap)}
    env |= {"MAX_TOTAL_TOKENS": str(cap), "REQUEST_DEADLINE_SECONDS": "600", "STREAM_INTERVAL_MS": "50"}
    with gunicorn_process(tiny_artifacts, **env) as (proc, base):
        started = threading.Barrier(65)

        def stream(seed: int) -> list[bytes]:
            with requests.post(
                f"{base}/v1/generate",
                json={"prompt": "KING.", "max_tokens": cap, "seed": seed, "stream": True},
                stream=True,
                timeout=(5, 30),
            ) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                first = next(line for line in lines if line)
                started.wait(timeout=30)
                return [first, *(line for line in lines if line)]

        with ThreadPoolExecutor(64) as pool:
            futures = [pool.submit(stream, seed) for seed in range(64)]
            started.wait(timeout=30)
            time.sleep(0.5)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            results = [future.result(timeout=60) for future in futures]
        proc.wait(timeout=30)
        exited = time.monotonic() - signalled
    assert exited < 4 + 3, f"the server took {exited:.1f} s to stop"
    for events in results:
        assert events[-1] == b"data: [DONE]"
        chunks = [json.loads(event[6:]) for event in events[:-1]]
        assert [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]] == ["shutdown"]
        assert chunks[-1]["usage"]["completion_tokens"] > 0
