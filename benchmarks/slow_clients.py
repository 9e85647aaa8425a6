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
REF`), side by side in the same run. It writes `slow_clients.json` and `slow_clients.md` into `--out`.
The helpers here (trickling connections, the prober) are also what tests/test_slow_clients.py uses.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from benchmarks.serve import ARTIFACTS, REPO, machine, percentile, unique_tag, utc_now, window, write_report
from tests.servers import start_checkout, stop

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


async def exchange(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes, float]:
    """One request on a new connection (as a Kubernetes probe makes it): the status, the body and the
    seconds to the whole answer."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    try:
        writer.write(head.encode() + b"\r\n" + payload)
        data = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    parts = status_line.split(b" ")
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return status, rest.partition(b"\r\n\r\n")[2], time.perf_counter() - started


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


@dataclass
class Load:
    ok_latencies: list[float] = field(default_factory=list)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    seconds: float = 0.0


async def next_token_clients(base: str, clients: int, seconds: float, honour_retry_after: bool = True) -> Load:
    """`clients` closed-loop next-token clients for `seconds` (after a 1 s warm-up that is not counted)."""
    load = Load()
    numbers = iter(range(10**9))
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as session:

        async def client(measure_from: float, until: float) -> None:
            while (started := time.monotonic()) < until:
                number = next(numbers)
                body = {"text": unique_tag(number, 6) + window(number, 94), "top_k": 5}
                wait = 0.0
                try:
                    async with session.post("/v1/next-token", json=body) as response:
                        await response.read()
                        status = str(response.status)
                        if response.status == 503 and honour_retry_after:
                            wait = float(response.headers.get("Retry-After", "1"))
                except (TimeoutError, aiohttp.ClientError) as exc:
                    status = type(exc).__name__
                if started >= measure_from:
                    load.statuses[status] += 1
                    if status == "200":
                        load.ok_latencies.append(time.monotonic() - started)
                if wait:
                    await asyncio.sleep(wait)

        measure_from = time.monotonic() + 1.0
        until = measure_from + seconds
        await asyncio.gather(*(client(measure_from, until) for _ in range(clients)))
    load.seconds = seconds
    return load


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


async def attack(port: int, mode: str, connections: int, seconds: float) -> dict[str, Any]:
    """What tests/test_slow_clients.py runs in a process of its own (a second machine, in effect), so that
    its well-behaved client measures the server rather than an event loop it shares with the attack.
    Prints "ready" once the attack is under way; returns what the attacking connections saw.

    headers / body: `connections` slowloris or slow-POST connections, one byte a second, no reconnecting;
    idle: `connections` keep-alive connections that each send one request and then stay idle;
    burst: `connections` next-token requests and a quarter as many 50-character generations at once."""
    until = time.monotonic() + seconds
    if mode in ("headers", "body"):
        stats = SlowStats()
        tasks = [
            asyncio.ensure_future(trickle(port, mode, 1.0, until, stats, reconnect=False)) for _ in range(connections)
        ]
        while stats.opened + stats.refused < connections and time.monotonic() < until:
            await asyncio.sleep(0.05)
        print("ready", flush=True)
        await asyncio.gather(*tasks)
        return {"opened": stats.opened, "refused": stats.refused, "answers": dict(stats.answers)}
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
    def __init__(self, repo: Path = REPO, **env: str) -> None:
        self.proc, self.base = start_checkout(repo, ARTIFACTS, LOG_LEVEL="WARNING", **env)
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


async def slow_part(server: Server, seconds: float, slow: int, mode: str, clients: int = 8) -> dict[str, Any]:
    until = time.monotonic() + 1.0 + seconds
    stats = SlowStats()
    trickles = [asyncio.ensure_future(trickle(server.port, mode, 5.0, until, stats)) for _ in range(slow)]
    await asyncio.sleep(0.5)  # the slow connections are open before the measured clients start
    (health, failures), load = await asyncio.gather(
        prober(server.port, until), next_token_clients(server.base, clients, seconds)
    )
    await asyncio.gather(*trickles)
    return {
        "clients": summary(load),
        "health": health_summary(health, failures),
        "slow_connections": {"opened": stats.opened, "closed_by_server": stats.closed_by_server,
                             "answers": dict(stats.answers), "refused": stats.refused},
    }  # fmt: skip


def slow_clients(repo: Path, seconds: float) -> dict[str, Any]:
    result: dict[str, Any] = {}
    runs = (("quiet_1_client", 0, "body", 1), ("quiet", 0, "body", 8), ("slow_post_512", 512, "body", 8),
            ("slowloris_512", 512, "headers", 8))  # fmt: skip
    for name, slow, mode, clients in runs:
        server = Server(repo)
        workers = server.workers()
        try:
            result[name] = asyncio.run(slow_part(server, seconds, slow, mode, clients))
            result[name]["workers_unchanged"] = server.workers() == workers
        finally:
            server.stop()
        print(f"  {repo.name} {name}: {json.dumps(result[name])}", flush=True)
    return result


def overload(seconds: float, levels: tuple[int, ...]) -> dict[str, Any]:
    server = Server()
    workers = server.workers()
    rows = {}
    try:
        for clients in levels:
            rows[str(clients)] = summary(asyncio.run(next_token_clients(server.base, clients, seconds)))
            print(f"  overload {clients}: {json.dumps(rows[str(clients)])}", flush=True)
        unchanged = server.workers() == workers
    finally:
        server.stop()
    best = max(row["ok_per_s"] for row in rows.values())
    saturation = next(level for level, row in rows.items() if row["ok_per_s"] >= 0.95 * best)
    return {"levels": rows, "saturation_clients": int(saturation), "workers_unchanged": unchanged}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Slow clients and overload",
        "",
        f"`python -m benchmarks.slow_clients --seconds {report['seconds']:g}`, {report['date']}, on "
        f"{report['machine']} ({report['cpu']}). The committed artifacts, 2 workers, default settings; "
        "loopback only.",
        "",
        "## Next-token clients, quiet and beside 512 slow connections",
        "",
        "| server | run | next-token req/s | p50 ms | p99 ms | /healthz p99 ms | probes failed | "
        "slow connections closed (answers) | workers unchanged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for server, parts in report["slow_clients"].items():
        for name, part in parts.items():
            slow = part["slow_connections"]
            lines.append(
                f"| {server} | {name} | {part['clients']['ok_per_s']} | {part['clients']['p50_ms']} | "
                f"{part['clients']['p99_ms']} | "
                f"{part['health']['p99_ms']} | {part['health']['failed']} of {part['health']['probes']} | "
                f"{slow['closed_by_server']} of {slow['opened']} {slow['answers'] or ''} | "
                f"{part['workers_unchanged']} |"
            )
    for server, ratios in report["ratios"].items():
        lines.append("")
        lines.append(
            f"{server}: next-token throughput beside slow POSTs {ratios['slow_post']:.2f} x quiet, beside "
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
    parser.add_argument("--overload-seconds", type=float, default=20.0, help="measured seconds per overload level")
    parser.add_argument("--baseline", type=Path, help="another checkout to run the slow-client part against too")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks", help="folder for the reports")
    parser.add_argument("--attack", choices=["headers", "body", "idle", "burst"], help="only run this attack")
    parser.add_argument("--port", type=int, help="with --attack: the server's port on 127.0.0.1")
    parser.add_argument("--connections", type=int, default=512, help="with --attack: how many")
    args = parser.parse_args(argv)
    if args.attack:
        print(json.dumps(asyncio.run(attack(args.port, args.attack, args.connections, args.seconds))))
        return 0
    servers = {"this checkout": REPO} | ({f"baseline ({args.baseline.name})": args.baseline} if args.baseline else {})
    report: dict[str, Any] = {"date": utc_now(), "machine": machine(), "cpu": cpu_name(), "seconds": args.seconds}
    report["slow_clients"] = {name: slow_clients(repo, args.seconds) for name, repo in servers.items()}
    report["ratios"] = {
        name: {
            kind: parts[f"{kind}_512"]["clients"]["ok_per_s"] / parts["quiet"]["clients"]["ok_per_s"]
            for kind in ("slow_post", "slowloris")
        }
        for name, parts in report["slow_clients"].items()
    }
    report["overload"] = overload(args.overload_seconds, (8, 32, 128, 512))
    levels = report["overload"]["levels"]
    report["overload_p99_ratio"] = (
        levels[str(max(map(int, levels)))]["p99_ms"] / levels[str(report["overload"]["saturation_clients"])]["p99_ms"]
    )
    write_report(args.out, "slow_clients", report, markdown(report))
    print(markdown(report))
    return 0


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
