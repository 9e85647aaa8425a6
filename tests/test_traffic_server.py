"""Weighted traffic on a real gunicorn server with two workers: 2,000 unpinned requests split by weight
with every `user` on one version in both workers, and a weight change by SIGHUP under streaming load that
fails nothing and finishes every stream on the version it started on."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from tests.conftest import gunicorn_process
from tests.test_repository import publish


def completion(base: str, user: str) -> str:
    body: dict[str, Any] = {"model": "bard", "prompt": "ROMEO:", "max_tokens": 1, "user": user}
    answer = requests.post(f"{base}/v1/completions", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["model"])


def stream(base: str, user: str) -> tuple[int, set[str], bool]:
    body: dict[str, Any] = {"model": "bard", "prompt": "KING:", "max_tokens": 40, "user": user, "stream": True}
    models, finished = set(), False
    with requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=60) as answer:
        for line in answer.iter_lines():
            if line.startswith(b"data: {"):
                chunk: Any = json.loads(line[6:])
                models.add(chunk["model"])
                finished |= chunk["choices"][0]["finish_reason"] is not None
        return answer.status_code, models, finished


def test_weights_split_traffic_and_change_under_load(tmp_path: Path, tiny_artifacts: Path) -> None:
    root = tmp_path / "models"
    publish(tiny_artifacts, root, "bard", 1)
    publish(tiny_artifacts, root, "bard", 2)
    (root / "bard" / "traffic.json").write_text(json.dumps({"weights": {"1": 90, "2": 10}}))
    with gunicorn_process(tiny_artifacts, MODEL_REPOSITORY=str(root), WORKERS="2") as (proc, base), \
            ThreadPoolExecutor(8) as pool:  # fmt: skip
        users = [f"reader-{i}" for i in range(2000)]
        first = list(pool.map(lambda user: completion(base, user), users))
        share = first.count("bard@1") / len(first)
        assert abs(share - 0.9) < 0.03, share
        again = list(pool.map(lambda user: completion(base, user), users[:300]))
        assert again == first[:300]  # the same user, the same version, whichever worker answered

        streams = [pool.submit(stream, base, f"streamer-{i}") for i in range(16)]
        time.sleep(0.2)
        (root / "bard" / "traffic.json").write_text(json.dumps({"weights": {"2": 1}}))
        os.kill(proc.pid, signal.SIGHUP)
        results = [s.result() for s in streams]
        assert all(status == 200 and len(models) == 1 and finished for status, models, finished in results)
        deadline = time.monotonic() + 10
        while {completion(base, f"after-{i}") for i in range(20)} != {"bard@2"}:
            assert time.monotonic() < deadline, "the new weights did not reach every worker"
            time.sleep(0.2)
