"""Rolling out model versions under load: the shipped gunicorn server on a model repository, loopback only.

    python -m benchmarks.rollout [--seconds 30] [--versions 5] [--poll 1] [--sighup] [--out benchmarks]

A repository starts with one version of the committed model. Eight clients keep the server busy: four
ask next-token (a 100-character prompt that no other request shares) and four read streamed
generations of 200 characters, each checked to its end ([DONE], 200 characters, one model version from
its first chunk to its last). First for `--seconds` on a quiet server; then while `--versions` new
versions are published one after another (`seqmodels.artifacts.publish_version`, as `python -m
training.publish` does), each once every worker serves the one before, and then a corrupt one (its LM
weights truncated before it is renamed in). The server finds them by polling every `--poll` seconds,
or, with `--sighup`, by a SIGHUP to the master after each publication (polling off).

Reported: requests and streams by outcome (failed, non-2xx, cut short must all be 0), next-token p50 and
p99 quiet and during the rollouts, how long each version took from publication to serving in every
worker, and that the corrupt version never served. Writes rollout.json and rollout.md into `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from benchmarks.common import (
    ARTIFACTS,
    REPO,
    RESULTS,
    cpu_name,
    machine,
    percentile,
    unique_tag,
    utc_now,
    window,
    write_report,
)
from benchmarks.servers import GunicornProcess, start_checkout, stop, wait_until_up
from seqmodels.artifacts import LM_DIR, WEIGHTS_FILE, next_version_dir, publish_version

MODEL = "shakespeare"
STREAM_TOKENS = 200
SERVING = re.compile(r'^charlm_model_serving_version\{model="([^"]+)",pid="(\d+)"\} ([0-9.]+)$', re.M)
REFUSED = re.compile(r"^charlm_model_versions_refused_total\{[^}]*\} ([0-9.]+)$", re.M)


@dataclass
class Traffic:
    """What the clients saw; `failed` are exceptions (resets, timeouts), `cut` streams that ended early."""

    latencies: list[float] = field(default_factory=list)  # next-token, 200s only
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    streams_complete: int = 0
    streams_cut: int = 0
    failed: int = 0
    models: collections.Counter[str] = field(default_factory=collections.Counter)  # versions that answered
    mixed_streams: int = 0  # streams whose chunks named more than one version


async def next_token_client(session: aiohttp.ClientSession, traffic: Traffic, stop: asyncio.Event, seed: int) -> None:
    number = seed * 1_000_000
    while not stop.is_set():
        number += 1
        body = {"model": MODEL, "text": unique_tag(number, 6) + window(number, 94), "top_k": 5}
        started = time.monotonic()
        try:
            async with session.post("/v1/next-token", json=body) as response:
                answer = await response.json(content_type=None)
                traffic.statuses[str(response.status)] += 1
                if response.status == 200:
                    traffic.latencies.append(time.monotonic() - started)
                    traffic.models[answer["model"]] += 1
        except (TimeoutError, aiohttp.ClientError, ValueError):
            traffic.failed += 1


async def stream_client(session: aiohttp.ClientSession, traffic: Traffic, stop: asyncio.Event, seed: int) -> None:
    number = seed * 1_000_000
    while not stop.is_set():
        number += 1
        body = {"model": MODEL, "prompt": window(number, 40), "max_tokens": STREAM_TOKENS, "stream": True,
                "seed": number}  # fmt: skip
        try:
            async with session.post("/v1/generate", json=body) as response:
                traffic.statuses[str(response.status)] += 1
                raw = (await response.read()).decode()
        except (TimeoutError, aiohttp.ClientError):
            traffic.failed += 1
            continue
        events = [line[6:] for line in raw.split("\n\n") if line.startswith("data: ")]
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        usage = chunks[-1].get("usage") if chunks else None
        if (
            response.status == 200
            and events[-1:] == ["[DONE]"]
            and usage
            and usage["completion_tokens"] == STREAM_TOKENS
        ):
            traffic.streams_complete += 1
        elif response.status == 200:
            traffic.streams_cut += 1
        versions = {c["model"] for c in chunks}
        traffic.mixed_streams += len(versions) > 1
        traffic.models.update(versions)


async def run_traffic(base: str, stop: asyncio.Event, clients: int = 8) -> Traffic:
    traffic = Traffic()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        half = clients // 2
        await asyncio.gather(
            *(next_token_client(session, traffic, stop, i) for i in range(half)),
            *(stream_client(session, traffic, stop, 100 + i) for i in range(clients - half)),
        )
    return traffic


def metrics(base: str) -> str:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        return str(response.read().decode())


def serving_versions(base: str, workers: list[int]) -> dict[int, int]:
    """The version of MODEL each live worker serves."""
    found = {int(pid): int(float(v)) for model, pid, v in SERVING.findall(metrics(base)) if model == MODEL}
    return {pid: found.get(pid, 0) for pid in workers}


def refused_total(base: str) -> float:
    return sum(float(v) for v in REFUSED.findall(metrics(base)))


def workers_of(proc: GunicornProcess) -> list[int]:
    return sorted(child.pid for child in psutil.Process(proc.pid).children())


def wait_for(condition: Any, limit: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > limit:
            raise RuntimeError(f"{what}: not within {limit:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - started


def publish_corrupt(source: Path, repository: Path) -> Path:
    """A version whose LM weights are truncated, renamed in whole: it must be refused, never served."""
    target = next_version_dir(repository, MODEL)
    staging = target.with_name(f".{target.name}.incoming")
    shutil.copytree(source, staging)
    weights = staging / LM_DIR / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return staging.rename(target)


def roll_out(proc: GunicornProcess, base: str, source: Path, repository: Path, versions: int, poll: float,
             sighup: bool) -> dict[str, Any]:  # fmt: skip
    """Publish `versions` new versions one after another, then a corrupt one; time each to every worker."""
    workers = workers_of(proc)
    seconds = []
    resources = [resources_now(workers)]
    for _ in range(versions):
        published = publish_version(source, repository, MODEL)
        version = int(published.name)
        if sighup:
            os.kill(proc.pid, signal.SIGHUP)
        limit = (poll if not sighup else 0) + 60
        seconds.append(
            wait_for(
                lambda v=version: set(serving_versions(base, workers).values()) == {v}, limit, f"version {version}"
            )
        )
        time.sleep(0.5)  # the retired version's last requests end and it is unloaded
        resources.append(resources_now(workers))
    last = version
    refused_before = refused_total(base)
    corrupt = publish_corrupt(source, repository)
    if sighup:
        os.kill(proc.pid, signal.SIGHUP)
    wait_for(lambda: refused_total(base) >= refused_before + len(workers), (poll if not sighup else 0) + 60, "refusal")
    time.sleep(max(poll, 1.0))  # another look at it, which must not load it either
    still = serving_versions(base, workers)
    with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as response:
        cards = json.loads(response.read())["data"]
    return {
        "memory_mib_per_worker": {c["id"]: round(c["memory_bytes"] / 2**20, 1) for c in cards if "@" in c["id"]},
        "versions": versions,
        "seconds_to_all_workers": [round(s, 2) for s in seconds],
        "corrupt_version": int(corrupt.name),
        "corrupt_refusals": refused_total(base) - refused_before,
        "serving_after_corrupt": sorted(set(still.values())),
        "corrupt_never_served": set(still.values()) == {last},
        "workers_unchanged": workers_of(proc) == workers,
        "resources_after_each_version": resources,
    }


def resources_now(workers: list[int]) -> dict[str, Any]:
    """What a rollout could leak: the shared memory in use on /dev/shm (the prefix cache's tables, mapped
    or not), and each worker's open descriptors and resident memory."""
    shm = os.statvfs("/dev/shm")
    processes = [psutil.Process(pid) for pid in workers]
    return {
        "dev_shm_used_mib": round((shm.f_blocks - shm.f_bfree) * shm.f_frsize / 2**20, 1),
        "worker_fds": [p.num_fds() for p in processes],
        "worker_rss_mib": [round(p.memory_info().rss / 2**20, 1) for p in processes],
    }


def summary(traffic: Traffic, seconds: float) -> dict[str, Any]:
    ms = [x * 1000 for x in traffic.latencies]
    non_2xx = sum(n for status, n in traffic.statuses.items() if not status.startswith("2"))
    return {
        "seconds": round(seconds, 1),
        "next_token_ok": len(ms),
        "next_token_p50_ms": round(percentile(ms, 50), 1),
        "next_token_p99_ms": round(percentile(ms, 99), 1),
        "streams_complete": traffic.streams_complete,
        "streams_cut": traffic.streams_cut,
        "failed": traffic.failed,
        "non_2xx": non_2xx,
        "streams_mixing_versions": traffic.mixed_streams,
        "answered_by": dict(sorted(traffic.models.items())),
    }


async def measure(base: str, seconds: float, during: Any = None) -> tuple[dict[str, Any], Any]:
    """Traffic for `seconds`, or for as long as `during` (a blocking function, run on a thread) takes."""
    stop_event = asyncio.Event()
    traffic_task = asyncio.create_task(run_traffic(base, stop_event))
    await asyncio.sleep(1.0)  # the clients are all busy before anything is measured or published
    started = time.monotonic()
    result = None
    if during is None:
        await asyncio.sleep(seconds)
    else:
        result = await asyncio.to_thread(during)
    stop_event.set()
    elapsed = time.monotonic() - started
    return summary(await traffic_task, elapsed), result


def run(artifacts: Path, seconds: float, versions: int, poll: float, sighup: bool, repo: Path = REPO) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="repository-") as folder:
        repository = Path(folder)
        publish_version(artifacts, repository, MODEL)
        env = {"MODEL_REPOSITORY": str(repository), "REPOSITORY_POLL_SECONDS": "0" if sighup else str(poll),
               "LOG_LEVEL": "WARNING"}  # fmt: skip
        proc, base = start_checkout(repo, artifacts, **env)
        try:
            wait_until_up(proc, base)
            wait_for(lambda: len(workers_of(proc)) >= 2, 90, "gunicorn workers")
            wait_for(lambda: set(serving_versions(base, workers_of(proc)).values()) == {1}, 30, "workers")
            quiet, _ = asyncio.run(measure(base, seconds))
            loaded, rollout = asyncio.run(
                measure(base, 0, lambda: roll_out(proc, base, artifacts, repository, versions, poll, sighup))
            )
        finally:
            log = stop(proc)
    return {"quiet": quiet, "rollout": loaded, "rollout_events": rollout, "server_log_tail": log[-2000:]}


def markdown(report: dict[str, Any]) -> str:
    quiet, loaded, events = report["quiet"], report["rollout"], report["rollout_events"]
    how = "SIGHUP to the master" if report["sighup"] else f"polling every {report['poll_seconds']:g} s"
    q, r = quiet, loaded
    rows = [
        "| | quiet | during rollouts |",
        "|---|---|---|",
        f"| seconds measured | {quiet['seconds']} | {loaded['seconds']} |",
        f"| next-token answers | {quiet['next_token_ok']} | {loaded['next_token_ok']} |",
        f"| next-token p50 / p99 (ms) | {quiet['next_token_p50_ms']} / {quiet['next_token_p99_ms']} "
        f"| {loaded['next_token_p50_ms']} / {loaded['next_token_p99_ms']} |",
        f"| streams of {STREAM_TOKENS} characters complete | {q['streams_complete']} | {r['streams_complete']} |",
        f"| streams cut short | {q['streams_cut']} | {r['streams_cut']} |",
        f"| streams that changed version midway | {q['streams_mixing_versions']} | {r['streams_mixing_versions']} |",
        f"| failed requests / non-2xx | {q['failed']} / {q['non_2xx']} | {r['failed']} / {r['non_2xx']} |",
        f"| answered by | {quiet['answered_by']} | {loaded['answered_by']} |",
    ]  # fmt: skip
    p99_ratio = loaded["next_token_p99_ms"] / quiet["next_token_p99_ms"]
    return (
        f"# Rolling out model versions under load\n\n"
        f"`{report['command']}`, {report['when']}, on {report['machine']} ({report['cpu']}); 2 workers, "
        f"8 clients (4 next-token, 4 streamed generate). {events['versions']} versions published one after "
        f"another, found by {how}, then a corrupt one.\n\n"
        + "\n".join(rows)
        + f"\n\nnext-token p99 during rollouts / quiet: {p99_ratio:.2f}x. Seconds from publication to every "
        f"worker serving, per version: {events['seconds_to_all_workers']}. The corrupt version "
        f"{events['corrupt_version']} was refused {events['corrupt_refusals']:g} times (once per worker) and "
        f"{'never served' if events['corrupt_never_served'] else 'SERVED'}; the workers were "
        f"{'unchanged' if events['workers_unchanged'] else 'REPLACED'}. Memory per worker of each loaded "
        f"version (`memory_bytes` in /v1/models, MiB): {events['memory_mib_per_worker']}.\n\n"
        + resources_table(events["resources_after_each_version"])
    )


def resources_table(samples: list[dict[str, Any]]) -> str:
    """/dev/shm in use, descriptors and resident memory before the first version and after each."""
    picks = sorted({0, 1, len(samples) // 2, len(samples) - 1})
    rows = ["| after version | /dev/shm in use (MiB) | open descriptors per worker | RSS per worker (MiB) |",
            "|---|---|---|---|"]  # fmt: skip
    for i in picks:
        sample = samples[i]
        label = "none yet" if i == 0 else f"{i} of {len(samples) - 1}"
        rows.append(f"| {label} | {sample['dev_shm_used_mib']} | {sample['worker_fds']} | {sample['worker_rss_mib']} |")
    return "What a rollout could leak, measured after each version served in every worker:\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rollout", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="quiet measurement")
    p.add_argument("--versions", type=int, default=5, help="versions rolled out one after another")
    p.add_argument("--poll", type=float, default=1.0, help="REPOSITORY_POLL_SECONDS")
    p.add_argument("--sighup", action="store_true", help="no polling: a SIGHUP to the master after each one")
    p.add_argument("--artifacts", type=Path, default=ARTIFACTS, help="the artifact published as every version")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    report = run(args.artifacts, args.seconds, args.versions, args.poll, args.sighup)
    report |= {
        "command": "python -m benchmarks.rollout" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
        "when": utc_now(),
        "machine": machine(),
        "cpu": cpu_name(),
        "poll_seconds": args.poll,
        "sighup": args.sighup,
    }
    stem = "rollout_sighup" if args.sighup else "rollout"
    write_report(args.out, stem, {k: v for k, v in report.items() if k != "server_log_tail"}, markdown(report))
    clean = all(report[part][key] == 0 for part in ("quiet", "rollout") for key in ("failed", "non_2xx", "streams_cut"))
    return 0 if clean and report["rollout_events"]["corrupt_never_served"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
