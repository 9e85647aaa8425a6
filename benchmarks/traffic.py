"""Traffic between versions: what shadow comparisons cost the primary traffic, and how soon a weight change
reaches every worker.

    python -m benchmarks.traffic [--clients 8] [--seconds 6] [--rounds 3] [--percent 10] [--out DIR]

One gunicorn server (2 workers) on a repository of two copies of the committed artifacts, loopback only.
Shadow cost: `--clients` closed-loop clients ask /v1/next-token (each prompt of its own) with the model's
shadow off and at `--percent` of requests, switched by traffic.json and SIGHUP, in alternating order
round after round so both see the same machine; goodput (200 answers per second) and p50 / p99 are
medians over the rounds. Reach: after traffic.json moves all weight to the other version, the time until
every worker's `charlm_model_traffic_weight` shows it, after a SIGHUP to the master (5 times), and found
by polling with REPOSITORY_POLL_SECONDS=1 (3 times); the report gives the median and the largest. Writes
traffic.json and traffic.md into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ARTIFACTS, RESULTS, phase_table, stamp, write_report
from benchmarks.inference_protocol import closed_loop, v1
from benchmarks.rollout import metrics, wait_for, workers_of
from benchmarks.servers import start_gunicorn, stop, wait_until_up
from training.publish import main as publish

MODEL = "bard"
WEIGHT = re.compile(r'charlm_model_traffic_weight\{model="bard@(\d+)",pid="(\d+)"\} ([0-9.e+-]+)')


def plan(root: Path, weights: dict[str, float], shadow_percent: float | None) -> None:
    document: dict[str, Any] = {"weights": weights}
    if shadow_percent is not None:
        document["shadow"] = {"version": 2, "percent": shadow_percent}
    path = root / MODEL / "traffic.json"
    staged = path.with_suffix(".new")
    staged.write_text(json.dumps(document))
    os.replace(staged, path)  # a reader sees the old file or the new one


def weights_by_worker(base: str) -> dict[int, dict[int, float]]:
    found: dict[int, dict[int, float]] = {}
    for version, pid, value in WEIGHT.findall(metrics(base)):
        found.setdefault(int(pid), {})[int(version)] = float(value)
    return found


def reach(proc: Any, base: str, root: Path, target: int, sighup: bool) -> float:
    """Seconds from the new traffic.json (and SIGHUP) until every worker gives `target` all the weight."""
    workers = workers_of(proc)
    plan(root, {str(target): 1}, None)
    if sighup:
        os.kill(proc.pid, signal.SIGHUP)

    def everywhere() -> bool:
        seen = weights_by_worker(base)
        return all(seen.get(pid, {}).get(target) == 1.0 for pid in workers)

    return wait_for(everywhere, 30, "the new weights")


def shadow_cost(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    proc, base = start_gunicorn(ARTIFACTS, MODEL_REPOSITORY=str(root), DEFAULT_MODEL=MODEL, QUALITY_GATE="false")
    rounds: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    try:
        wait_until_up(proc, base)
        phases = [("off", None), ("on", args.percent)]
        for round_number in range(args.rounds):
            for phase, percent in phases if round_number % 2 == 0 else phases[::-1]:  # off-on, on-off, ...
                plan(root, {"1": 1}, percent)
                os.kill(proc.pid, signal.SIGHUP)
                time.sleep(1.0)
                rounds[phase].append(asyncio.run(closed_loop(base, args.clients, args.seconds, v1)))
        dropped = sum(float(v) for v in re.findall(r"charlm_shadow_dropped_total\{[^}]*\} ([0-9.e+]+)", metrics(base)))
        compared = sum(
            float(v) for v in re.findall(r"charlm_shadow_comparisons_total\{[^}]*\} ([0-9.e+]+)", metrics(base))
        )
    finally:
        stop(proc)
    medians = {phase: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for phase, runs in rounds.items()}
    return {"phases": medians, "compared": compared, "dropped": dropped}


def reach_times(root: Path) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"sighup": [], "poll_1s": []}
    for how, env, repeats in (("sighup", {}, 5), ("poll_1s", {"REPOSITORY_POLL_SECONDS": "1"}, 3)):
        plan(root, {"1": 1}, None)
        proc, base = start_gunicorn(ARTIFACTS, MODEL_REPOSITORY=str(root), DEFAULT_MODEL=MODEL, **env)
        try:
            wait_until_up(proc, base)
            for i in range(repeats):
                times[how].append(reach(proc, base, root, target=2 if i % 2 == 0 else 1, sighup=how == "sighup"))
        finally:
            stop(proc)
    return times


def markdown(report: dict[str, Any]) -> str:
    shadow = report["shadow"]["phases"]
    ratio = shadow["on"]["goodput"] / shadow["off"]["goodput"]
    lines = [
        "# Traffic between versions",
        "",
        f"`{report['command']}`, {report['when']}, on {report['machine']} ({report['cpu']}); one server with "
        f"2 workers, loopback.",
        "",
        f"Shadow comparisons at {report['percent']:g} % of requests against none, {report['clients']} clients "
        f"on /v1/next-token, medians of {report['rounds']} alternating rounds of {report['seconds']:g} s:",
        "",
        *phase_table("shadow", shadow),
        "",
        f"With the shadow on, goodput is {ratio:.2f} x that with it off; {report['shadow']['compared']:.0f} "
        f"requests were compared and {report['shadow']['dropped']:.0f} dropped by a full queue.",
        "",
        "A weight change, until every worker has it:",
        "",
        "| how | times | median s | largest s |",
        "|---|---|---|---|",
    ]
    for how, times in report["reach"].items():
        lines.append(f"| {how} | {len(times)} | {statistics.median(times):.2f} | {max(times):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.traffic", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--percent", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="charlm-traffic-") as folder:
        root = Path(folder) / "models"
        for _ in range(2):
            assert publish([str(ARTIFACTS), "--repository", str(root), "--name", MODEL]) == 0
        shadow = shadow_cost(args, root)
        times = reach_times(root)
    report = {
        **stamp("benchmarks.traffic", argv),
        "clients": args.clients,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "percent": args.percent,
        "shadow": shadow,
        "reach": times,
    }
    write_report(args.out, "traffic", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
