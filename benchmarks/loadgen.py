"""The load generator of the serving benchmarks: a scenario (what to send, how many clients at once),
the shipped gunicorn server wrapped so that its CPU use and its workers' memory can be read, and a
closed-loop asyncio client that drives a scenario against it and sums up what it measured; closed-loop
next-token clients, each prompt of its own; and one request on a new connection, as a probe sends it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import psutil

from benchmarks.common import ARTIFACTS, percentile, unique_tag, window
from benchmarks.servers import start_gunicorn, stop

# --------------------------------------------------------------------------- what to send


@dataclass
class Scenario:
    name: str
    method: str
    path: str
    body: Callable[[int], dict[str, Any]] | None  # the body of request number n
    concurrency: int
    stream: bool = False
    conversation: Conversation | None = None  # each client's request follows from its previous answer


class Conversation:
    """Per client, a chat that grows by one turn per request: the previous prompt, the reply the server
    streamed to it, then a new line; it starts over (with a new opening, so that no two conversations
    share a prefix) before it would pass `limit` characters."""

    def __init__(self, reply_chars: int, first: int = 0, limit: int = 3500) -> None:
        """`first`: the number of its first conversation; runs on one server need ranges of their own."""
        self.reply_chars, self.limit = reply_chars, limit
        self.history: dict[int, str] = {}
        self.started = itertools.count(first)

    def body(self, client: int, number: int) -> dict[str, Any]:
        history = self.history.get(client, "")
        turn = f"\nHAMLET. {unique_tag(number, 4)} {window(number * 37, 55)}\nHORATIO."
        if not history or len(history) + len(turn) + self.reply_chars > self.limit:
            number = next(self.started)
            history = f"{unique_tag(number, 6)} {window(number * 53, 33)}\n"  # an opening of its own
        self.history[client] = history + turn
        return {"prompt": self.history[client], "max_tokens": self.reply_chars, "temperature": 0.8,
                "seed": number, "stream": True}  # fmt: skip

    def reply(self, client: int, text: str) -> None:
        self.history[client] += text


@dataclass
class Result:
    scenario: str
    batching: bool
    concurrency: int
    seconds: float
    requests: int
    errors: int
    error_kinds: dict[str, int]
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    chars_per_s: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    server_cpu_percent: float = 0.0  # of one core; the machine has os.cpu_count() of them
    client_cpu_percent: float = 0.0
    worker_rss_mib: list[float] = field(default_factory=list)
    worker_pss_mib: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- the server


class Server:
    def __init__(self, batching: bool, precision: str = "auto", **env: str) -> None:
        self.env = {"WORKERS": os.environ.get("WORKERS", "2"), "MAX_TOKENS": "1024", **env}
        self.proc, self.base = start_gunicorn(
            ARTIFACTS, BATCHING="1" if batching else "0", PRECISION=precision, LOG_LEVEL="WARNING", **self.env
        )
        self.port = int(self.base.rsplit(":", 1)[1])
        self.master = psutil.Process(self.proc.pid)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.proc.output()}")
            try:
                with urllib.request.urlopen(f"{self.base}/readyz", timeout=2) as response:
                    if response.status == 200 and len(self.master.children()) >= int(self.env["WORKERS"]):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("gunicorn did not become ready")

    def processes(self) -> list[psutil.Process]:
        return [self.master, *self.master.children(recursive=True)]

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.processes():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def worker_memory(self) -> tuple[list[float], list[float]]:
        rss, pss = [], []
        for proc in self.master.children():
            info = proc.memory_full_info()
            rss.append(round(info.rss / 2**20, 1))
            pss.append(round(info.pss / 2**20, 1))
        return rss, pss

    def stop(self) -> None:
        stop(self.proc)


Key = TypeVar("Key")


@contextlib.contextmanager
def running(servers: dict[Key, Server]) -> Iterator[dict[Key, Server]]:
    """The servers, once every one of them is ready; all of them stopped at the end, whatever happens."""
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


# --------------------------------------------------------------------------- the clients

# One count for the whole run: a server serves several runs, and a prompt seen before would hit its prefix cache.
REQUEST_NUMBERS = itertools.count()


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


@dataclass
class Load:
    ok_latencies: list[float] = field(default_factory=list)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    seconds: float = 0.0


async def next_token_clients(base: str, clients: int, seconds: float, honour_retry_after: bool = True) -> Load:
    """`clients` closed-loop next-token clients for `seconds` (after a 1 s warm-up that is not counted)."""
    load = Load()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as session:

        async def client(measure_from: float, until: float) -> None:
            while (started := time.monotonic()) < until:
                number = next(REQUEST_NUMBERS)
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


@dataclass
class Tally:
    """What the requests started after the warm-up got: latencies and times to the first token (s),
    the characters received, and errors by kind."""

    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    chars: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, started: float, error: str | None, chars: int, first: float | None) -> None:
        self.chars += chars
        if error:
            self.errors[error] += 1
            return
        self.latencies.append(time.perf_counter() - started)
        if first is not None:
            self.first_tokens.append(first)


async def one_request(
    session: aiohttp.ClientSession, scenario: Scenario, client: int, number: int
) -> tuple[str | None, int, float | None]:
    """One request of `scenario`: an error kind or None, the characters received, and the time to the
    first one."""
    started = time.perf_counter()
    body: dict[str, Any] | None
    if scenario.conversation is not None:
        body = scenario.conversation.body(client, number)
    else:
        body = scenario.body(number) if scenario.body else None
    async with session.request(scenario.method, scenario.path, json=body) as response:
        if response.status != 200:
            await response.read()
            return f"HTTP {response.status}", 0, None
        if not scenario.stream:
            body = await response.json()
            return None, sum(len(c["text"]) for c in body.get("choices", [])), None
        chars, first, done, received = 0, None, False, []
        async for raw in response.content:
            line = raw.strip()
            done = done or line == b"data: [DONE]"
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            text = "".join(c["text"] for c in json.loads(line[6:])["choices"])
            if text and first is None:
                first = time.perf_counter() - started
            chars += len(text)
            received.append(text)
        if scenario.conversation is not None:
            scenario.conversation.reply(client, "".join(received))
        # No [DONE]: an error event, or a stream cut short.
        return (None if done else "stream ended without [DONE]"), chars, first


async def drive(
    base: str,
    scenario: Scenario,
    seconds: float,
    cpu: Callable[[], tuple[float, float]],
    headers: dict[str, str] | None = None,
) -> tuple[list[float], list[float], int, dict[str, int], float, tuple[float, float]]:
    """Closed-loop load: latencies (s), times to first token (s), characters received, errors by kind, wall
    time, and the change in `cpu()` (server and client CPU seconds) over the measured part.

    Each client runs without a pause from the start of the warm-up to the end; only requests it
    starts after the warm-up count. (Waiting for every warm-up request to end left connections
    idle for seconds behind slow streams, past the server's keep-alive timeout, and a request
    sent just as the server closed one failed.)"""
    tally = Tally()
    numbers = itertools.count()
    connector = aiohttp.TCPConnector(limit=scenario.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout, headers=headers) as session:

        async def client(index: int, measure_from: float, until: float) -> None:
            while (started := time.perf_counter()) < until:
                try:
                    error, chars, first = await one_request(session, scenario, index, next(numbers))
                except (TimeoutError, aiohttp.ClientError) as exc:
                    error, chars, first = f"{type(exc).__name__}: {exc}"[:120], 0, None
                if started >= measure_from:
                    tally.add(started, error, chars, first)

        warm_up = min(1.0, seconds / 4)
        measure_from = time.perf_counter() + warm_up
        until = measure_from + seconds
        snapshots: list[tuple[float, float]] = []
        asyncio.get_running_loop().call_later(warm_up, lambda: snapshots.append(cpu()))
        await asyncio.gather(*(client(i, measure_from, until) for i in range(scenario.concurrency)))
        wall = time.perf_counter() - measure_from
        cpu_after = cpu()
    used = (cpu_after[0] - snapshots[0][0], cpu_after[1] - snapshots[0][1])
    return tally.latencies, tally.first_tokens, tally.chars, dict(tally.errors), wall, used


def measure(server: Server, scenario: Scenario, batching: bool, seconds: float) -> Result:
    """`scenario` driven against `server` for `seconds`, summed up and printed in a line."""
    me = psutil.Process()

    def cpu() -> tuple[float, float]:
        return server.cpu_seconds(), sum(me.cpu_times()[:2])

    latencies, first_tokens, chars, errors, wall, (server_cpu, client_cpu) = asyncio.run(
        drive(server.base, scenario, seconds, cpu)
    )
    rss, pss = server.worker_memory()
    ms = [x * 1000 for x in latencies]
    result = Result(
        scenario=scenario.name,
        batching=batching,
        concurrency=scenario.concurrency,
        seconds=round(wall, 2),
        requests=len(latencies),
        errors=sum(errors.values()),
        error_kinds=errors,
        requests_per_s=round(len(latencies) / wall, 1),
        p50_ms=round(percentile(ms, 50), 2),
        p95_ms=round(percentile(ms, 95), 2),
        p99_ms=round(percentile(ms, 99), 2),
        chars_per_s=round(chars / wall, 1) if chars else None,
        ttft_p50_ms=round(percentile([x * 1000 for x in first_tokens], 50), 2) if first_tokens else None,
        ttft_p95_ms=round(percentile([x * 1000 for x in first_tokens], 95), 2) if first_tokens else None,
        server_cpu_percent=round(100 * server_cpu / wall, 1),
        client_cpu_percent=round(100 * client_cpu / wall, 1),
        worker_rss_mib=rss,
        worker_pss_mib=pss,
    )
    print(
        f"  {scenario.name:<28} c={scenario.concurrency:<3} {result.requests_per_s:>8.1f} req/s"
        f"  p50 {result.p50_ms:>8.2f} ms  p99 {result.p99_ms:>8.2f} ms"
        + (f"  {result.chars_per_s:>8.1f} chars/s" if result.chars_per_s else "")
        + (f"  ttft p50 {result.ttft_p50_ms:.1f} ms" if result.ttft_p50_ms else "")
        + f"  cpu {result.server_cpu_percent}% (client {result.client_cpu_percent}%)"
        + f"  errors {result.errors} {errors or ''}",
        flush=True,
    )
    return result
