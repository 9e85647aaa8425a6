"""Slow clients and overload: the shipped gunicorn server, the committed artifacts, loopback only.

    python -m benchmarks.slow_clients [--seconds 60] [--baseline PATH] [--out benchmarks]

Three parts, each against a fresh server:

- slow clients: well-behaved clients send next-token requests (a 100-character prompt that no other
  request shares) for `--seconds`: 1 and then 8 of them on a quiet server, then 8 while 512 other
  connections send their headers and then trickle a body one byte every 5 s (slow POST), and 8 while
  512 trickle their headers (slowloris); the slow ones reconnect when the server closes them. A prober
  asks /healthz on a new connection every 100 ms throughout. Reported: the clients' throughput, p50
  and p99, the probe's p99 and failures, and what happened to the slow connections.
- overload: closed-loop next-token clients at 8, 32, 128 and 512 at once. A client that gets 503 waits
  for its Retry-After, as a client that honours it does. Reported per level: answers by status,
  throughput, and the p50/p99 of the admitted (200) requests; the saturation point is the smallest
  level within 5 % of the best throughput.
- workers: the worker pids before and after, which must match (no worker died or was restarted).

`--baseline PATH` runs the slow-client part against a second checkout too (say, `git worktree add PATH
REF`), side by side in the same run; `--nginx` runs it once more through Debian's nginx as a buffering
reverse proxy in front of that checkout (or of this one), the usual alternative. It writes
`slow_clients.json` and `slow_clients.md` into `--out`. `--attack MODE` runs one attack alone, as
tests/test_slow_clients.py does in a process of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import ARTIFACTS, REPO, RESULTS, cpu_name, machine, percentile, utc_now, write_report
from benchmarks.loadgen import Load, exchange, next_token_clients
from benchmarks.servers import free_port, start_checkout, stop

SLOW_PATH = b"/v1/next-token"


@dataclass
class SlowStats:
    opened: int = 0
    closed_by_server: int = 0  # answered (408) or closed while trickling
    answers: collections.Counter[str] = field(default_factory=collections.Counter)  # status lines received
    refused: int = 0  # connection attempts that failed


async def trickle(
    port: int, mode: str, interval: float, until: float, stats: SlowStats, reconnect: bool = True
) -> None:
    """One slow client until `until`: mode "headers" sends a request line, then one header byte per
    `interval` (slowloris); mode "body" sends whole headers announcing 10,000 bytes, then one body byte
    per `interval` (slow POST). With `reconnect`, it opens a new connection when the server closes it."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            stats.refused += 1
            await asyncio.sleep(interval)
            continue
        stats.opened += 1
        head = b"POST " + SLOW_PATH + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        if mode == "body":
            head += b"Content-Length: 10000\r\n\r\n"
        writer.write(head)
        answer = asyncio.ensure_future(reader.read(4096))
        try:
            while time.monotonic() < until and not answer.done():
                await asyncio.wait([answer], timeout=interval)
                if not answer.done():
                    writer.write(b"X" if mode == "headers" else b" ")
                    await writer.drain()
        except OSError:
            pass
        if answer.done():
            stats.closed_by_server += 1
            with contextlib.suppress(Exception):
                data = answer.result()
                stats.answers[data.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"] += 1
        else:
            answer.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        if not reconnect:
            return


async def probe(port: int, path: str = "/healthz") -> float:
    """Seconds for a GET of `path` on a new connection; raises on anything but 200."""
    status, _, seconds = await exchange(port, "GET", path)
    if status != 200:
        raise RuntimeError(f"{path} answered {status}")
    return seconds


async def prober(port: int, until: float, every: float = 0.1, limit: float = 5.0) -> tuple[list[float], int]:
    """/healthz every `every` seconds until `until`: latencies, and failures (errors or over `limit`)."""
    latencies: list[float] = []
    failures = 0
    while time.monotonic() < until:
        try:
            latencies.append(await asyncio.wait_for(probe(port), limit))
        except (OSError, RuntimeError, TimeoutError):
            failures += 1
        await asyncio.sleep(every)
    return latencies, failures


def summary(load: Load) -> dict[str, Any]:
    ms = [x * 1000 for x in load.ok_latencies]
    return {
        "answers": dict(load.statuses),
        "ok_per_s": round(len(ms) / load.seconds, 1),
        "p50_ms": round(percentile(ms, 50), 1),
        "p99_ms": round(percentile(ms, 99), 1),
    }


def health_summary(latencies: list[float], failures: int) -> dict[str, Any]:
    ms = [x * 1000 for x in latencies]
    return {"probes": len(ms) + failures, "failed": failures, "p50_ms": round(percentile(ms, 50), 1),
            "p99_ms": round(percentile(ms, 99), 1)}  # fmt: skip


# --------------------------------------------------------------------------- one attack, for the tests


async def attack(
    port: int, mode: str, connections: int, seconds: float, interval: float = 1.0, reconnect: bool = False
) -> dict[str, Any]:
    """An attack, run in a process of its own (a second machine, in effect) by the benchmark and by
    tests/test_slow_clients.py, so that the well-behaved clients measure the server rather than an event
    loop they share with the attack. Prints "ready" once it is under way; returns what the attacking
    connections saw.

    headers / body: `connections` slowloris or slow-POST connections, one byte per `interval`;
    idle: `connections` keep-alive connections that each send one request and then stay idle;
    burst: `connections` next-token requests and a quarter as many 50-character generations at once."""
    until = time.monotonic() + seconds
    if mode in ("headers", "body"):
        stats = SlowStats()
        tasks = [
            asyncio.ensure_future(trickle(port, mode, interval, until, stats, reconnect)) for _ in range(connections)
        ]
        while stats.opened + stats.refused < connections and time.monotonic() < until:
            await asyncio.sleep(0.05)
        print("ready", flush=True)
        await asyncio.gather(*tasks)
        return {"opened": stats.opened, "refused": stats.refused, "answers": dict(stats.answers),
                "closed_by_server": stats.closed_by_server}  # fmt: skip
    if mode == "idle":
        idle = []
        for _ in range(connections):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            idle.append((reader, writer))
        answers: collections.Counter[str] = collections.Counter()
        for reader, _ in idle:
            answers[(await reader.readline()).decode().strip()] += 1
            await reader.readuntil(b"\r\n\r\n")
        print("ready", flush=True)
        await asyncio.sleep(max(0.0, until - time.monotonic()))
        for _, writer in idle:
            writer.close()
        return {"opened": len(idle), "answers": dict(answers)}
    next_token = {"text": "To be, or not to be", "top_k": 3}
    generate = {"prompt": "KING.", "max_tokens": 50}
    requests = [exchange(port, "POST", "/v1/next-token", next_token) for _ in range(connections)]
    requests += [exchange(port, "POST", "/v1/generate", generate) for _ in range(connections // 4)]
    answered = asyncio.gather(*requests)
    await asyncio.sleep(0.1)
    print("ready", flush=True)
    results = await answered
    refused = [json.loads(body)["error"] for status, body, _ in results if status == 503]
    return {
        "statuses": dict(collections.Counter(str(status) for status, _, _ in results)),
        "refused_codes": sorted({error["code"] for error in refused}),
        "refused_max_seconds": max((seconds for status, _, seconds in results if status == 503), default=0.0),
    }


# --------------------------------------------------------------------------- the parts


class Server:
    def __init__(self, repo: Path = REPO, env: dict[str, str] | None = None) -> None:
        self.proc, self.base = start_checkout(repo, ARTIFACTS, LOG_LEVEL="WARNING", **(env or {}))
        self.port = int(self.base.rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError, RuntimeError):
                asyncio.run(probe(self.port, "/readyz"))
                if len(self.workers()) >= 2:
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not start:\n{self.proc.output()}")
            time.sleep(0.2)

    def workers(self) -> list[int]:
        return sorted(child.pid for child in psutil.Process(self.proc.pid).children())

    def stop(self) -> None:
        stop(self.proc)


NGINX_CONF = """
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_header_timeout 10s;
    client_body_timeout 30s;
    client_max_body_size 1m;
    keepalive_timeout 5s;
    upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering on;
            proxy_buffering off;
        }}
    }}
}}
"""


class NginxFront:
    """Debian's nginx as a buffering reverse proxy in front of a server: the usual alternative to reading
    requests in the worker, measured beside it."""

    def __init__(self, upstream: int) -> None:
        self.prefix = Path(tempfile.mkdtemp(prefix="charlm-nginx-"))
        self.port = free_port()
        conf = self.prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=self.prefix, upstream=upstream, port=self.port))
        self.proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", str(self.prefix), "-g", "daemon off;"], stderr=subprocess.DEVNULL
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError, RuntimeError):
                asyncio.run(probe(self.port, "/readyz"))
                return
            if time.monotonic() > deadline:
                raise RuntimeError("nginx did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.prefix, ignore_errors=True)


@contextlib.contextmanager
def attacking(
    port: int, mode: str, connections: int, seconds: float, interval: float = 1.0, reconnect: bool = False
) -> Iterator[dict[str, Any]]:
    """`--attack MODE` in a process of its own, under way inside the block; afterwards the dict holds what
    the attacking connections saw."""
    command = [sys.executable, "-m", "benchmarks.slow_clients", "--attack", mode, "--port", str(port),
               "--connections", str(connections), "--seconds", str(seconds), "--interval", str(interval)]  # fmt: skip
    with subprocess.Popen(command + ["--reconnect"] * reconnect, cwd=REPO, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the attack did not start")
        seen: dict[str, Any] = {}
        yield seen
        out, _ = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError("the attack failed")
        seen.update(json.loads(out))


async def measured_clients(server: Server | NginxFront, seconds: float, clients: int) -> dict[str, Any]:
    until = time.monotonic() + 1.0 + seconds
    (health, failures), load = await asyncio.gather(
        prober(server.port, until), next_token_clients(server.base, clients, seconds)
    )
    return {"clients": summary(load), "health": health_summary(health, failures)}


def slow_part(server: Server | NginxFront, seconds: float, slow: int, mode: str, clients: int = 8) -> dict[str, Any]:
    """`clients` next-token clients and the prober for `seconds`, beside `slow` connections trickling a byte
    every 5 s (and reconnecting when closed) in `mode`."""
    if not slow:
        return asyncio.run(measured_clients(server, seconds, clients)) | {"slow_connections": {}}
    with attacking(server.port, mode, slow, seconds + 2, 5.0, reconnect=True) as seen:
        result = asyncio.run(measured_clients(server, seconds, clients))
    return result | {"slow_connections": seen}


RUNS = (  # name, slow connections, their mode, measured clients, share of --seconds
    ("quiet_1_client", 0, "body", 1, 1 / 3),
    ("quiet", 0, "body", 8, 1.0),
    ("slow_post_512", 512, "body", 8, 1.0),
    ("slowloris_512", 512, "headers", 8, 1.0),
)


@dataclass
class Side:
    """One server of the comparison: a checkout's gunicorn, maybe behind nginx, and its runs' length."""

    name: str
    repo: Path
    nginx: bool
    seconds: float

    def start(self) -> None:
        self.server = Server(self.repo)
        self.front = NginxFront(self.server.port) if self.nginx else None
        self.workers = self.server.workers()
        asyncio.run(measured_clients(self.target, 10.0, 8))  # warm-up, not recorded: the first seconds run slower

    @property
    def target(self) -> Server | NginxFront:
        return self.front or self.server

    def stop(self) -> None:
        if self.front is not None:
            self.front.stop()
        self.server.stop()


def slow_clients(sides: list[Side], rounds: int) -> dict[str, Any]:
    """Every side's runs, `rounds` times, the sides taking turns within each round (the machine's speed
    drifts over minutes, so side-by-side means interleaved); per side and run, every round's figures
    and their medians."""
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {side.name: {name: [] for name, *_ in RUNS} for side in sides}
    unchanged = {}
    try:
        for side in sides:
            side.start()
        for round_number in range(rounds):
            for side in sides:
                for name, slow, mode, clients, share in RUNS:
                    rows[side.name][name].append(slow_part(side.target, side.seconds * share, slow, mode, clients))
                    print(f"  {side.name} round {round_number + 1} {name}: {json.dumps(rows[side.name][name][-1])}",
                          flush=True)  # fmt: skip
                    time.sleep(2)  # connections the server closed at the end finish closing
        for side in sides:
            unchanged[side.name] = side.server.workers() == side.workers
    finally:
        for side in sides:
            if hasattr(side, "server"):
                side.stop()
    return {
        side: {
            name: {
                "rounds": runs,
                "ok_per_s": statistics.median(run["clients"]["ok_per_s"] for run in runs),
                "p50_ms": statistics.median(run["clients"]["p50_ms"] for run in runs),
                "p99_ms": statistics.median(run["clients"]["p99_ms"] for run in runs),
                "health_p99_ms": statistics.median(run["health"]["p99_ms"] for run in runs),
                "probes_failed": sum(run["health"]["failed"] for run in runs),
                "probes": sum(run["health"]["probes"] for run in runs),
                "slow_closed": sum(run["slow_connections"].get("closed_by_server", 0) for run in runs),
                "slow_opened": sum(run["slow_connections"].get("opened", 0) for run in runs),
                "workers_unchanged": unchanged[side],
            }
            for name, runs in side_rows.items()
        }
        for side, side_rows in rows.items()
    }


OVERLOAD_LEVELS = (8, 16, 32, 64, 128, 512)


def overload(seconds: float, levels: tuple[int, ...] = OVERLOAD_LEVELS, **env: str) -> dict[str, Any]:
    """Closed-loop next-token clients at each level in turn, on one server started with `env`."""
    server = Server(env=env)
    workers = server.workers()
    rows = {}
    try:
        for clients in levels:
            rows[str(clients)] = summary(asyncio.run(next_token_clients(server.base, clients, seconds)))
            print(f"  overload {env or ''} {clients}: {json.dumps(rows[str(clients)])}", flush=True)
        unchanged = server.workers() == workers
    finally:
        server.stop()
    best = max(row["ok_per_s"] for row in rows.values())
    saturation = next(level for level, row in rows.items() if row["ok_per_s"] >= 0.95 * best)
    p99_ratio = rows[str(max(levels))]["p99_ms"] / rows[saturation]["p99_ms"]
    return {
        "levels": rows,
        "saturation_clients": int(saturation),
        "p99_ratio": p99_ratio,
        "workers_unchanged": unchanged,
    }


def waiting_trial(seconds: float, values: list[float]) -> int:
    """The overload levels once per QUEUE_WAIT_SECONDS value: overload_waiting.json and .md."""
    trials = {f"{value:g}": overload(seconds, QUEUE_WAIT_SECONDS=f"{value:g}") for value in values}
    lines = [
        "# Overload by QUEUE_WAIT_SECONDS",
        "",
        f"`python -m benchmarks.slow_clients --waiting {' '.join(f'{v:g}' for v in values)} "
        f"--overload-seconds {seconds:g}`, "
        f"{utc_now()}, on {machine()} ({cpu_name()}). Closed-loop next-token clients, a 503 waits its "
        "Retry-After; 2 workers of 32 threads.",
        "",
        "| QUEUE_WAIT_SECONDS | clients | answers | 200/s | p50 ms (200) | p99 ms (200) |",
        "|---|---|---|---|---|---|",
    ]
    for value, trial in trials.items():
        for clients, row in trial["levels"].items():
            lines.append(
                f"| {value} | {clients} | {row['answers']} | {row['ok_per_s']} | {row['p50_ms']} | {row['p99_ms']} |"
            )
    lines.append("")
    for value, trial in trials.items():
        lines.append(
            f"- {value} s of waiting: saturation at {trial['saturation_clients']} clients; "
            f"p99 at {max(OVERLOAD_LEVELS)} "
            f"clients {trial['p99_ratio']:.2f} x that at saturation; workers unchanged: {trial['workers_unchanged']}."
        )
    write_report(RESULTS, "overload_waiting", {"trials": trials}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def markdown(report: dict[str, Any]) -> str:
    args = report["arguments"]
    lines = [
        "# Slow clients and overload",
        "",
        f"`python -m benchmarks.slow_clients {args}`, {report['date']}, on {report['machine']} ({report['cpu']}). "
        "The committed artifacts, 2 workers, default settings; loopback only. Each run is repeated in "
        f"{report['rounds']} rounds, in turn on one server per row group; the figures are medians over the "
        "rounds (probes and connections: totals).",
        "",
        "## Next-token clients, quiet and beside 512 slow connections (a byte every 5 s, reconnecting)",
        "",
        "| server | run | seconds | next-token req/s | p50 ms | p99 ms | /healthz p99 ms | probes failed | "
        "slow connections closed by the server | workers unchanged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for server, runs in report["slow_clients"].items():
        seconds = report["seconds_by_server"][server]
        for (name, *_, share), row in zip(RUNS, runs.values(), strict=True):
            lines.append(
                f"| {server} | {name} | {seconds * share:.0f} | {row['ok_per_s']} | {row['p50_ms']} | {row['p99_ms']} "
                f"| {row['health_p99_ms']} | {row['probes_failed']} of {row['probes']} | "
                f"{row['slow_closed']} of {row['slow_opened']} | {row['workers_unchanged']} |"
            )
    lines.append("")
    for server, ratios in report["ratios"].items():
        lines.append(
            f"- {server}: next-token throughput beside slow POSTs {ratios['slow_post']:.2f} x quiet, beside "
            f"slowloris {ratios['slowloris']:.2f} x quiet."
        )
    load = report["overload"]
    lines += [
        "",
        "## Closed-loop next-token clients (a 503 waits its Retry-After)",
        "",
        "| clients | answers | 200/s | p50 ms (200) | p99 ms (200) |",
        "|---|---|---|---|---|",
    ]
    for clients, row in load["levels"].items():
        lines.append(f"| {clients} | {row['answers']} | {row['ok_per_s']} | {row['p50_ms']} | {row['p99_ms']} |")
    lines += [
        "",
        f"Saturation point: {load['saturation_clients']} clients (the fewest within 5 % of the best "
        f"throughput). p99 of admitted requests at {max(map(int, load['levels']))} clients: "
        f"{report['overload_p99_ratio']:.2f} x that at the saturation point. Workers unchanged: "
        f"{load['workers_unchanged']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds per slow-client run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the slow-client runs")
    parser.add_argument("--compare-seconds", type=float, default=20.0, help="--seconds for --baseline and --nginx")
    parser.add_argument("--overload-seconds", type=float, default=15.0, help="measured seconds per overload level")
    parser.add_argument("--baseline", type=Path, help="another checkout to run the slow-client part against too")
    parser.add_argument("--nginx", action="store_true", help="also run it through Debian's nginx in front of the "
                        "baseline (or of this checkout), as a buffering proxy")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the reports")
    parser.add_argument(
        "--waiting", type=float, nargs="+", help="only the overload part, once per QUEUE_WAIT_SECONDS value given"
    )
    parser.add_argument("--attack", choices=["headers", "body", "idle", "burst"], help="only run this attack")
    parser.add_argument("--port", type=int, help="with --attack: the server's port on 127.0.0.1")
    parser.add_argument("--connections", type=int, default=512, help="with --attack: how many")
    parser.add_argument("--interval", type=float, default=1.0, help="with --attack: seconds between trickled bytes")
    parser.add_argument("--reconnect", action="store_true", help="with --attack: reopen what the server closes")
    args = parser.parse_args(argv)
    if args.attack:
        seen = attack(args.port, args.attack, args.connections, args.seconds, args.interval, args.reconnect)
        print(json.dumps(asyncio.run(seen)))
        return 0
    if args.waiting:
        return waiting_trial(args.overload_seconds, args.waiting)
    sides = [Side("this checkout", REPO, False, args.seconds)]
    if args.baseline:
        sides.append(Side(f"baseline ({args.baseline.name})", args.baseline, False, args.compare_seconds))
    if args.nginx:
        behind = f"baseline ({args.baseline.name})" if args.baseline else "this checkout"
        sides.append(Side(f"nginx in front of {behind}", args.baseline or REPO, True, args.compare_seconds))
    report: dict[str, Any] = {
        "date": utc_now(),
        "machine": machine(),
        "cpu": cpu_name(),
        "arguments": " ".join(argv if argv is not None else sys.argv[1:]),
        "rounds": args.rounds,
        "seconds_by_server": {side.name: side.seconds for side in sides},
    }
    report["slow_clients"] = slow_clients(sides, args.rounds)
    report["ratios"] = {
        name: {kind: runs[f"{kind}_512"]["ok_per_s"] / runs["quiet"]["ok_per_s"] for kind in ("slow_post", "slowloris")}
        for name, runs in report["slow_clients"].items()
    }
    report["overload"] = overload(args.overload_seconds)
    report["overload_p99_ratio"] = report["overload"]["p99_ratio"]
    write_report(args.out, "slow_clients", report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
