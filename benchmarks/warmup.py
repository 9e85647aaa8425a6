"""What warmup buys: the first requests' latency after a start and after a rollout, with the warmup
(WARMUP_BATCH_SIZES=1,8,32) and without it.

    python -m benchmarks.warmup [--starts 3] [--out DIR]

Each start is a fresh gunicorn server (2 workers) on the committed artifacts, loopback only: the seconds
until /readyz answers, then the first /v1/next-token, the first /v1/generate (32 characters) and the
first 8 next-token requests sent at once (the slowest of them), and for comparison the same requests
five times more (medians: warm). Each rollout publishes a new version into
a repository the server watches, sends SIGHUP, waits until every worker serves it, and times the same
first requests on it. Medians over --starts starts and rollouts per setting. Writes warmup.json and
warmup.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import ARTIFACTS, RESULTS, stamp, write_report
from benchmarks.rollout import serving_versions, wait_for, workers_of
from benchmarks.servers import answers, start_gunicorn, stop
from training.publish import main as publish

MODEL = "shakespeare"
SETTINGS = {"warmup": {"WARMUP_BATCH_SIZES": "1,8,32"}, "no warmup": {"WARMUP_BATCH_SIZES": ""}}


def post_ms(base: str, path: str, body: dict[str, Any]) -> float:
    request = urllib.request.Request(f"{base}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()
    return (time.perf_counter() - started) * 1000


def first_requests(base: str, salt: str) -> dict[str, float]:
    """The first requests' latencies (ms): prompts no earlier request used, so no cache answers them."""
    figures = {
        "next_token_ms": post_ms(base, "/v1/next-token", {"model": MODEL, "text": f"{salt} ROMEO: But soft"}),
        "generate_ms": post_ms(base, "/v1/generate", {"model": MODEL, "prompt": f"{salt} JULIET:", "max_tokens": 32}),
    }
    with ThreadPoolExecutor(8) as pool:
        texts = [f"{salt} {i} KING: What news?" for i in range(8)]
        figures["eight_at_once_ms"] = max(
            pool.map(lambda t: post_ms(base, "/v1/next-token", {"model": MODEL, "text": t}), texts)
        )
    return figures


def one_start(setting: dict[str, str], attempt: int) -> tuple[float, dict[str, float], dict[str, float]]:
    """A fresh server: seconds until ready, the first requests after the start and after a rollout."""
    with tempfile.TemporaryDirectory(prefix="charlm-warmup-") as folder:
        root = Path(folder) / "models"
        assert publish([str(ARTIFACTS), "--repository", str(root), "--name", MODEL]) == 0
        started = time.monotonic()
        proc, base = start_gunicorn(ARTIFACTS, MODEL_REPOSITORY=str(root), **setting)
        try:
            wait_for(lambda: answers(base, "/readyz") or proc.poll() is not None, 120, "ready")
            ready = time.monotonic() - started
            after_start = first_requests(base, f"s{attempt}")
            later = [first_requests(base, f"w{attempt}-{i}") for i in range(5)]  # the same requests, warm
            after_start |= {f"warm_{key}": statistics.median(f[key] for f in later) for key in later[0]}
            assert publish([str(ARTIFACTS), "--repository", str(root), "--name", MODEL]) == 0
            workers = workers_of(proc)
            os.kill(proc.pid, signal.SIGHUP)
            wait_for(lambda: set(serving_versions(base, workers).values()) == {2}, 120, "the rollout")
            return ready, after_start, first_requests(base, f"r{attempt}")
        finally:
            stop(proc)


def run(setting: dict[str, str], starts: int) -> dict[str, Any]:
    runs = [one_start(setting, attempt) for attempt in range(starts)]
    phases = {"after_start": [r[1] for r in runs], "after_rollout": [r[2] for r in runs]}
    return {
        "ready_s": statistics.median(r[0] for r in runs),
        **{
            phase: {key: statistics.median(f[key] for f in found) for key in found[0]}
            for phase, found in phases.items()
        },
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Warmup",
        "",
        f"`{report['command']}`, {report['when']}, on {report['machine']} ({report['cpu']}); medians of "
        f"{report['starts']} starts and rollouts per setting, 2 workers, loopback.",
        "",
        "| setting | ready after s | when | first next-token ms | first generate (32) ms | first 8 at once ms |",
        "|---|---|---|---|---|---|",
    ]
    warm = report["settings"]["no warmup"]["after_start"]
    steady = (f"| (the same requests later, warm) | | | {warm['warm_next_token_ms']:.1f} "
              f"| {warm['warm_generate_ms']:.1f} | {warm['warm_eight_at_once_ms']:.1f} |")  # fmt: skip
    for name, figures in report["settings"].items():
        for phase in ("after_start", "after_rollout"):
            f = figures[phase]
            lines.append(
                f"| {name} | {figures['ready_s']:.1f} | {phase.replace('_', ' ')} | {f['next_token_ms']:.1f} "
                f"| {f['generate_ms']:.1f} | {f['eight_at_once_ms']:.1f} |"
            )
    lines.append(steady)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.warmup", description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    settings = {name: run(env, args.starts) for name, env in SETTINGS.items()}
    report = {
        **stamp("benchmarks.warmup", argv),
        "starts": args.starts,
        "settings": settings,
    }
    write_report(args.out, "warmup", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
