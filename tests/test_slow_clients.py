"""Slow clients, idle connections and overload against the real gunicorn server on loopback.

Each attack runs for a few seconds and is bounded in count; during it, a well-behaved client's
/healthz and next-token requests must succeed within a second each, a stream started before it must
run to its end, and no worker may die or be restarted.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from benchmarks.balance import established
from benchmarks.servers import GunicornProcess
from benchmarks.slow_clients import SlowStats, attacking, trickle
from tests.conftest import booted_workers, gunicorn_process

SLOW_CONNECTIONS = 512
WELL_BEHAVED_LIMIT = 1.0  # seconds for a probe or a next-token request while under attack
NEXT_TOKEN: dict[str, Any] = {"text": "To be, or not to be", "top_k": 3}


class Server:
    def __init__(self, proc: GunicornProcess, base: str) -> None:
        self.proc, self.base = proc, base
        self.port = int(base.rsplit(":", 1)[1])
        self.workers = sorted(booted_workers(proc.pid, 2))

    def workers_unchanged(self) -> bool:
        return sorted(child.pid for child in psutil.Process(self.proc.pid).children()) == self.workers

    def metric(self, name: str) -> float:
        text = requests.get(f"{self.base}/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path) -> Iterator[Server]:
    with gunicorn_process(tiny_artifacts, WORKERS="2", HEADER_TIMEOUT_SECONDS="30") as (proc, base):
        yield Server(proc, base)


def well_behaved(base: str, rounds: int = 4, busy_allowed: bool = False) -> None:
    """Probe and next-token in turn, each on a new connection, while an attack goes on: each must answer
    200 within the limit (with `busy_allowed`, next-token may be told 503 instead: an overloaded server's
    right answer)."""
    for _ in range(rounds):
        started = time.monotonic()
        assert requests.get(f"{base}/healthz", timeout=WELL_BEHAVED_LIMIT).status_code == 200
        assert time.monotonic() - started < WELL_BEHAVED_LIMIT
        started = time.monotonic()
        answer = requests.post(f"{base}/v1/next-token", json=NEXT_TOKEN, timeout=WELL_BEHAVED_LIMIT)
        assert time.monotonic() - started < WELL_BEHAVED_LIMIT
        if not (busy_allowed and answer.status_code == 503):
            assert answer.status_code == 200 and len(answer.json()["candidates"]) == 3
        time.sleep(0.5)


class StreamInFlight(threading.Thread):
    """A streamed generation in flight before an attack starts; `check()` says it ran to its end."""

    def __init__(self, base: str, max_tokens: int = 300) -> None:
        super().__init__(daemon=True)
        self.base, self.max_tokens, self.text, self.done = base, max_tokens, "", False
        self.streaming = threading.Event()
        self.start()
        assert self.streaming.wait(10), "the stream did not start"

    def run(self) -> None:
        body: dict[str, Any] = {"prompt": "KING.", "max_tokens": self.max_tokens, "seed": 3, "stream": True}
        with requests.post(f"{self.base}/v1/generate", json=body, stream=True, timeout=60) as response:
            for line in response.iter_lines():
                self.streaming.set()
                if line == b"data: [DONE]":
                    self.done = True
                elif line.startswith(b"data: "):
                    self.text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
                time.sleep(0.01)  # slower than the server: the stream stays in flight through the attack

    def check(self) -> None:
        self.streaming.set()
        self.join(60)
        assert self.done and len(self.text) == self.max_tokens


@pytest.mark.parametrize("mode", ["headers", "body"])
def test_512_slow_connections_starve_nothing(server: Server, mode: str) -> None:
    """Slowloris (headers trickled) and slow POST (headers sent, body trickled): each costs the server a
    socket, not a request thread."""
    stream = StreamInFlight(server.base)
    with attacking(server.port, mode, SLOW_CONNECTIONS, 5.0) as seen:
        well_behaved(server.base)
    assert seen == {"opened": SLOW_CONNECTIONS, "refused": 0, "answers": {}, "closed_by_server": 0}  # deadline 30 s
    stream.check()
    assert server.workers_unchanged()


def test_a_client_that_reads_its_stream_slowly_holds_up_no_one(server: Server) -> None:
    sock = slow_reader(server.port, "/v1/generate", {"prompt": "KING.", "max_tokens": 1000, "n": 3, "seed": 1})
    received = b""  # it reads nothing more for a while
    stream = StreamInFlight(server.base)
    well_behaved(server.base)
    stream.check()
    sock.settimeout(30)
    while chunk := sock.recv(256):  # a slow reader still gets its whole stream
        received += chunk
        if b"data: [DONE]" in received:
            break
    sock.close()
    assert b"data: [DONE]" in received
    assert server.workers_unchanged()


def test_many_idle_keep_alive_connections(server: Server) -> None:
    stream = StreamInFlight(server.base)
    with attacking(server.port, "idle", SLOW_CONNECTIONS, 5.0) as seen:
        well_behaved(server.base)
    assert seen == {"opened": SLOW_CONNECTIONS, "answers": {"HTTP/1.1 200 OK": SLOW_CONNECTIONS}}
    stream.check()
    assert server.workers_unchanged()


def test_an_overload_burst_is_answered_at_once_with_503_and_retry_after(tiny_artifacts: Path) -> None:
    """With 4 threads per worker and half a second of waiting allowed, 400 next-token and 100 generate requests at once:
    each gets 200, or 503 with the error envelope; the probes still answer within a second, and a
    well-behaved client's next-token is answered within a second too (200, or 503: come back later)."""
    env = {"WORKERS": "2", "THREADS": "4", "QUEUE_WAIT_SECONDS": "0.5"}
    with gunicorn_process(tiny_artifacts, **env) as (proc, base):
        server = Server(proc, base)
        stream = StreamInFlight(base)
        with attacking(server.port, "burst", 400, 5.0) as seen:
            well_behaved(base, rounds=3, busy_allowed=True)
        assert sorted(seen["statuses"]) == ["200", "503"] and sum(seen["statuses"].values()) == 500
        assert seen["refused_codes"] == ["overloaded"]
        assert server.metric('charlm_requests_refused_total{reason="overloaded"}') >= seen["statuses"]["503"]
        stream.check()
        assert requests.post(f"{base}/v1/next-token", json=NEXT_TOKEN, timeout=1).status_code == 200
        assert server.workers_unchanged()


def slow_reader(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    """A client with a small receive buffer that asks for a stream and reads only the status line's start."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    payload = json.dumps(body | {"stream": True}).encode()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    assert sock.recv(64).startswith(b"HTTP/1.1 200")
    return sock


# 8 prompts, n=4, five alternatives per character: megabytes, more than the kernel's socket buffers hold,
# so the server's writes soon block on a reader that stops. The server needs MAX_TOTAL_TOKENS >= 32,000.
HUGE_STREAM = {"model": "char-lstm", "prompt": ["KING."] * 8, "max_tokens": 1000, "n": 4, "logprobs": 5}


def test_a_stalled_reader_loses_its_connection_at_the_write_timeout(tiny_artifacts: Path) -> None:
    """One worker with one request thread and no waiting allowed: while a stalled reader holds the thread,
    other requests get 503 with Retry-After at once and probes still answer; at WRITE_TIMEOUT_SECONDS
    the stalled connection is closed, and the thread serves again."""
    env = {"WORKERS": "1", "THREADS": "1", "QUEUE_WAIT_SECONDS": "0", "WRITE_TIMEOUT_SECONDS": "3",
           "MAX_TOTAL_TOKENS": "32000"}  # fmt: skip
    with gunicorn_process(tiny_artifacts, **env) as (_, base):
        stalled = slow_reader(int(base.rsplit(":", 1)[1]), "/v1/completions", HUGE_STREAM)
        time.sleep(0.5)
        answer = requests.post(f"{base}/v1/next-token", json=NEXT_TOKEN, timeout=1)
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
        assert answer.json()["error"]["type"] == "service_unavailable"
        assert requests.get(f"{base}/healthz", timeout=1).status_code == 200  # probes have threads of their own
        # The 503 keeps the connection but reads nothing more on it before its Retry-After: of 300 requests
        # pipelined on it, only the first is answered meanwhile. A HEAD one gets the headers only.
        port = int(base.rsplit(":", 1)[1])
        for method in (b"GET", b"HEAD"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as pipelined:
                pipelined.sendall((method + b" /v1/models HTTP/1.1\r\nHost: x\r\n\r\n") * 300)
                data = b""
                while b"\r\n\r\n" not in data or (method == b"GET" and b"}}" not in data):
                    data += pipelined.recv(1 << 16)
                head, _, body = data.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 503") and b"Connection: keep-alive" in head
                assert b"Retry-After: 1" in head
                assert body == b"" if method == b"HEAD" else b'"overloaded"' in body and body.endswith(b"}}")
                pipelined.settimeout(0.5)
                with pytest.raises(TimeoutError):  # the rest wait, unread, for the Retry-After
                    pipelined.recv(1)
        deadline = time.monotonic() + 10
        while (status := requests.post(f"{base}/v1/next-token", json=NEXT_TOKEN, timeout=1).status_code) == 503:
            assert time.monotonic() < deadline, "the stalled reader kept its thread past the write timeout"
            time.sleep(0.25)
        assert status == 200
        metrics = requests.get(f"{base}/metrics", timeout=1).text
        assert 'charlm_connections_timed_out_total{phase="write"} 1.0' in metrics
        stalled.close()


def test_deadlines_answer_408_and_close(tiny_artifacts: Path) -> None:
    env = {"WORKERS": "2", "HEADER_TIMEOUT_SECONDS": "1", "BODY_TIMEOUT_SECONDS": "1"}
    with gunicorn_process(tiny_artifacts, **env) as (proc, base):
        server = Server(proc, base)
        for mode in ("headers", "body"):
            stats = SlowStats()
            started = time.monotonic()
            asyncio.run(trickle(server.port, mode, 0.2, started + 10, stats, reconnect=False))
            assert 1.0 <= time.monotonic() - started < 4  # a total deadline: a trickle does not extend it
            assert stats.answers == {"HTTP/1.1 408 Request Timeout": 1}
        assert server.metric('charlm_connections_timed_out_total{phase="headers"}') == 1
        assert server.metric('charlm_connections_timed_out_total{phase="body"}') == 1
        # A client that says nothing at all is closed at the header deadline too, without an answer that
        # a pooling client would take for the answer to its next request.
        silent = socket.create_connection(("127.0.0.1", server.port))
        silent.settimeout(5)
        assert silent.recv(100) == b""
        silent.close()
        assert server.metric('charlm_connections_timed_out_total{phase="idle"}') == 1


def test_header_limits(server: Server) -> None:
    """gunicorn's limits on the request line, a header field and the number of fields hold, answered
    in the JSON error envelope; a header block that never ends is not read past what they allow."""

    def send(raw: bytes) -> tuple[int, dict[str, Any]]:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(raw)
            sock.settimeout(10)
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"Content-Type: application/json" in head
        return int(head.split(b" ")[1]), json.loads(body)["error"]

    status, error = send(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 414 and error["code"] == "uri_too_long"
    status, error = send(b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n")
    assert status == 431 and error["type"] == "invalid_request_error"
    many = b"".join(b"X-%d: a\r\n" % i for i in range(101))
    assert send(b"GET /healthz HTTP/1.1\r\n" + many + b"\r\n")[0] == 431
    assert send(b"GET /healthz HTTP/1.1\r\n" + b"X-Long: a\r\n" * 100_000)[0] == 431
    assert send(b"BREW /healthz HTCPCP/1.0\r\n\r\n")[0] == 400
    assert requests.get(f"{server.base}/healthz", timeout=1).status_code == 200


def test_connections_beyond_the_cap_wait_in_the_listen_queue(tiny_artifacts: Path) -> None:
    with gunicorn_process(tiny_artifacts, WORKERS="1", MAX_CONNECTIONS="20") as (proc, base):
        port = int(base.rsplit(":", 1)[1])
        (worker,) = (psutil.Process(pid) for pid in booted_workers(proc.pid, 1))
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
        time.sleep(1.0)
        assert established(worker, port) == 20
        for sock in held:
            sock.close()
        assert requests.get(f"{base}/healthz", timeout=5).status_code == 200


def test_expect_100_continue_and_chunked_bodies(server: Server) -> None:
    body = json.dumps(NEXT_TOKEN).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(10)
        head = "POST /v1/next-token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
        sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode())
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200") and b"100 Continue" not in answer
    chunks = iter([body[:10], body[10:]])
    chunked = requests.post(
        f"{server.base}/v1/next-token", data=chunks, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert chunked.status_code == 200 and len(chunked.json()["candidates"]) == 3
