"""Hostile framing on raw sockets against the real gunicorn server on loopback.

Each malformed or ambiguous request gets exactly one answer from the worker's event loop (4xx in the
JSON error envelope) and then a closed connection, so that a request pipelined behind it is never read,
on the normal path and on the overload path (where the loop answers 503 itself). Trickled and tiny-chunk
bodies hold no request thread, a /metrics flood does not delay probes, and no worker exits, answers 500
or logs a traceback. Every socket has a timeout; each attack is bounded in count and time.
"""

from __future__ import annotations

import errno
import json
import re
import socket
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import h11
import pytest

from benchmarks.servers import GunicornProcess
from service.server.worker import GracefulThreadWorker
from tests.conftest import REPO, booted_workers, children, gunicorn_process
from tests.test_slow_clients import HUGE_STREAM, NEXT_TOKEN, slow_reader, well_behaved

SMUGGLED = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"  # must never be answered behind a refused request
PAYLOAD = json.dumps(NEXT_TOKEN).encode()
POST = b"POST /v1/next-token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"
ANSWER_SECONDS = 2.0  # a refusal comes at once: far under the 10 s header deadline


class Watched:
    """A server started for this module: its port, and a check that its workers are the ones it started
    with and that its log holds no 500 and no traceback."""

    def __init__(self, proc: GunicornProcess, base: str, workers: int) -> None:
        self.proc, self.base = proc, base
        self.port = int(base.rsplit(":", 1)[1])
        self.workers = sorted(booted_workers(proc.pid, workers))

    def check(self) -> None:
        assert sorted(children(self.proc.pid)) == self.workers, "a worker exited"
        log = self.proc.output()
        assert "Traceback" not in log and not re.search(r'"status": 5\d\d', log), log[-3000:]


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path) -> Iterator[Watched]:
    with gunicorn_process(tiny_artifacts, WORKERS="2") as (proc, base):
        watched = Watched(proc, base, 2)
        yield watched
        watched.check()


@pytest.fixture(scope="module")
def overloaded(tiny_artifacts: Path) -> Iterator[Watched]:
    """One worker whose only request thread a stalled stream holds, with no waiting allowed
    (QUEUE_WAIT_SECONDS 0): the loop answers every model request with 503. Its body budget holds two
    1 MiB bodies, not three."""
    env = {"WORKERS": "1", "THREADS": "1", "QUEUE_WAIT_SECONDS": "0", "WRITE_TIMEOUT_SECONDS": "120",
           "MAX_TOTAL_TOKENS": "32000", "MAX_BUFFERED_BYTES": str(5 << 19)}  # fmt: skip
    with gunicorn_process(tiny_artifacts, **env) as (proc, base):
        watched = Watched(proc, base, 1)
        stalled = slow_reader(watched.port, "/v1/completions", HUGE_STREAM)
        try:
            yield watched
        finally:
            stalled.close()
        watched.check()


# --------------------------------------------------------------------------- reading answers


def parse_answer(data: bytes | bytearray) -> tuple[tuple[int, bytes, bytes], int] | None:
    """The first whole answer in `data` (status, head, body by Content-Length) and its length; None if
    it has not all arrived."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(data[:end])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if len(data) < end + 4 + length:
        return None
    return (int(head.split(b" ", 2)[1]), head, bytes(data[end + 4 : end + 4 + length])), end + 4 + length


def read_answers(sock: socket.socket, count: int) -> list[tuple[int, bytes, bytes]]:
    """`count` answers from a connection that stays open."""
    answers: list[tuple[int, bytes, bytes]] = []
    buffer = bytearray()
    while len(answers) < count:
        chunk = sock.recv(1 << 16)
        assert chunk, f"closed after {len(answers)} answers"
        buffer += chunk
        while (parsed := parse_answer(buffer)) is not None:
            answers.append(parsed[0])
            del buffer[: parsed[1]]
    return answers


def answers_until_closed(sock: socket.socket) -> list[tuple[int, bytes, bytes]]:
    """Every answer until the server closes the connection; all of what came must be whole answers."""
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    answers = []
    while data:
        parsed = parse_answer(data)
        assert parsed is not None, f"a partial answer: {data[:300]!r}"
        answers.append(parsed[0])
        data = data[parsed[1] :]
    return answers


def refused_once(port: int, raw: bytes) -> tuple[int, bytes, dict[str, Any]]:
    """Send `raw` with a request pipelined behind it: the one answer (status, head, error envelope),
    after which the server has closed the connection without answering the pipelined request."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw + SMUGGLED)
        answers = answers_until_closed(sock)
    assert time.monotonic() - started < ANSWER_SECONDS
    assert len(answers) == 1, [head for _, head, _ in answers]
    status, head, body = answers[0]
    assert b"Content-Type: application/json" in head and b"Connection: close" in head
    return status, head, json.loads(body)["error"]


# --------------------------------------------------------------------------- what must be refused

HOSTILE = {
    "content_length_4400_digits": (POST + b"Content-Length: " + b"9" * 4400 + b"\r\n\r\n", 400),
    "chunk_size_21_hex_digits": (CHUNKED + b"0" * 20 + b"2\r\n{}\r\n0\r\n\r\n", 400),
    "chunk_size_17_hex_digits": (CHUNKED + b"1" + b"0" * 16 + b"\r\n", 413),  # 2**64: larger than any body
    "chunk_size_then_space": (CHUNKED + b"2 \r\n{}\r\n0\r\n\r\n", 400),
    "chunk_size_after_space": (CHUNKED + b" 2\r\n{}\r\n0\r\n\r\n", 400),
    "chunk_size_0x": (CHUNKED + b"0x2\r\n{}\r\n0\r\n\r\n", 400),
    "chunk_size_negative": (CHUNKED + b"-1\r\n{}\r\n0\r\n\r\n", 400),
    "chunk_extension_bare_cr": (CHUNKED + b"2;a\rb\r\n{}\r\n0\r\n\r\n", 400),
    "chunk_extension_without_name": (CHUNKED + b"2;=x\r\n{}\r\n0\r\n\r\n", 400),
    "chunk_data_without_crlf": (CHUNKED + b"2\r\n{}XX0\r\n\r\n", 400),
    "trailer_content_length": (CHUNKED + b"2\r\n{}\r\n0\r\nContent-Length: 2\r\n\r\n", 400),
    "trailer_host": (CHUNKED + b"2\r\n{}\r\n0\r\nHost: elsewhere\r\n\r\n", 400),
    "trailer_transfer_encoding": (CHUNKED + b"2\r\n{}\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    "content_length_and_chunked": (
        POST + b"Content-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        400,
    ),
    "transfer_encoding_space_colon": (POST + b"Transfer-Encoding : chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400),
    "transfer_encoding_folded": (POST + b"Transfer-Encoding: identity\r\n chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400),
    "obs_fold": (POST + b"X-Note: a\r\n\tb\r\nContent-Length: 2\r\n\r\n{}", 400),
    "content_length_list": (POST + b"Content-Length: 33, 33\r\n\r\n" + PAYLOAD[:33].ljust(33), 400),
    "content_length_twice": (POST + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}", 400),
    "transfer_encoding_gzip": (POST + b"Transfer-Encoding: gzip\r\n\r\n", 501),
    "chunked_http_10": (b"POST /v1/next-token HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400),
    "lf_only_head": (b"GET /healthz HTTP/1.1\nHost: x\n\n", 400),
    "lf_only_unfinished_head": (b"GET /healthz HTTP/1.1\nHost: x\n", 400),
    "expect_other_than_100_continue": (POST + b"Expect: 100-continue, foo\r\nContent-Length: 2\r\n\r\n{}", 417),
    "no_host": (b"GET /healthz HTTP/1.1\r\n\r\n", 400),
    "two_hosts": (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "http_2_request_line": (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_framing_gets_one_answer_then_close(server: Watched, name: str) -> None:
    raw, expected = HOSTILE[name]
    status, _, error = refused_once(server.port, raw)
    assert status == expected and error["type"] == "invalid_request_error", error
    server.check()


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_framing_on_the_overload_path(overloaded: Watched, name: str) -> None:
    raw, expected = HOSTILE[name]
    assert refused_once(overloaded.port, raw)[0] == expected
    overloaded.check()


def test_pipelining_still_works_where_the_framing_is_sound(server: Watched) -> None:
    """The control: the same pipelined request is answered behind a well-framed one."""
    chunked = CHUNKED + b"%x\r\n" % len(PAYLOAD) + PAYLOAD + b"\r\n0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(chunked + SMUGGLED + POST + b"Content-Length: %d\r\n\r\n" % len(PAYLOAD) + PAYLOAD + SMUGGLED)
        assert [status for status, _, _ in read_answers(sock, 4)] == [200, 200, 200, 200]
    server.check()


def test_an_overload_answer_keeps_the_connection_and_reads_on_after_its_retry_after(overloaded: Watched) -> None:
    """A whole request refused for load gets 503 with Retry-After and keeps its connection; what the client
    pipelined behind it is read only once the Retry-After has passed (a client that retries at once costs
    nothing meanwhile), then answered. With `Connection: close` it closes, and HEAD gets the head only."""
    with socket.create_connection(("127.0.0.1", overloaded.port), timeout=10) as sock:
        sent = time.monotonic()
        sock.sendall(POST + b"Content-Length: %d\r\n\r\n" % len(PAYLOAD) + PAYLOAD + SMUGGLED)
        (status, head, body), (behind, _, _) = read_answers(sock, 2)
        assert status == 503 and b"Retry-After: 1" in head and b"Connection: keep-alive" in head
        assert json.loads(body)["error"]["code"] == "overloaded"
        assert behind == 200 and time.monotonic() - sent >= 1.0  # /readyz, read after the Retry-After
    with socket.create_connection(("127.0.0.1", overloaded.port), timeout=10) as sock:
        sock.sendall(b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + SMUGGLED)
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    assert data.startswith(b"HTTP/1.1 503") and data.count(b"HTTP/1.1") == 1 and data.endswith(b"\r\n\r\n")
    assert b"Connection: close" in data
    overloaded.check()


def test_the_body_budget_answers_503_and_is_given_back(overloaded: Watched) -> None:
    """Two connections that have sent all but a byte of 1 MiB bodies hold the budget (bytes held count, not
    bytes announced); a third body is refused with 503 once it would go over, and the budget comes back
    when they go away."""
    head = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    holders = [socket.create_connection(("127.0.0.1", overloaded.port), timeout=5) for _ in range(2)]
    for sock in holders:
        sock.sendall(head % (1 << 20) + b" " * ((1 << 20) - 1))
    time.sleep(0.5)
    status, answer_head, error = refused_once(overloaded.port, head % (1 << 20) + b" " * (1 << 20))
    assert status == 503 and b"Retry-After: 1" in answer_head and error["code"] == "overloaded"
    for sock in holders:
        sock.close()
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", overloaded.port), timeout=0.5) as sock:
        sock.sendall(head % (1 << 20))
        with pytest.raises(TimeoutError):  # being read, not refused
            sock.recv(100)
    overloaded.check()


# --------------------------------------------------------------------------- slow and expensive bodies


def test_trickled_chunked_bodies_hold_no_thread(server: Watched) -> None:
    """Chunked bodies (with 17-digit chunk sizes) trickled a byte every 0.3 s to /healthz and /v1/score
    while probes and next-token requests answer within a second; then each trickled request is answered."""
    score = json.dumps({"texts": ["To be"]}).encode()
    bodies = [(b"GET /healthz", b"{}")] * 3 + [(b"POST /v1/score", score)] * 2
    trickled = []
    for target, payload in bodies:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(
            target + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        trickled.append((sock, b"%017x\r\n" % len(payload) + payload + b"\r\n0\r\n\r\n"))

    def trickle() -> None:
        until = time.monotonic() + 3.0
        for i in range(max(len(rest) for _, rest in trickled)):
            if time.monotonic() > until:
                break
            for sock, rest in trickled:
                sock.sendall(rest[i : i + 1])
            time.sleep(0.3)
        for sock, rest in trickled:
            sock.sendall(rest[i:])

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    well_behaved(server.base, rounds=4)
    sender.join(10)
    for sock, _ in trickled:
        with sock:
            assert [status for status, _, _ in read_answers(sock, 1)] == [200]
    server.check()


def test_a_metrics_flood_does_not_delay_probes(server: Watched) -> None:
    """200 GET /metrics pipelined on 4 connections: /healthz and next-token still answer within a second,
    and every scrape is answered."""
    floods = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(4)]
    answered: list[list[int]] = [[] for _ in floods]

    def drain(i: int) -> None:
        answered[i] = [status for status, _, _ in read_answers(floods[i], 50)]

    readers = [threading.Thread(target=drain, args=(i,), daemon=True) for i in range(len(floods))]
    for sock, reader in zip(floods, readers, strict=True):
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
        reader.start()
    well_behaved(server.base, rounds=2)
    for sock, reader in zip(floods, readers, strict=True):
        reader.join(60)
        sock.close()
    assert answered == [[200] * 50] * 4
    server.check()


def test_a_body_of_one_byte_chunks_is_answered_quickly(server: Watched) -> None:
    """64 KiB in 65,536 chunks of one byte (a JSON body padded with spaces): parsed as it arrives, with
    no quadratic cost, and answered 200."""
    body = json.dumps({"texts": ["To be, or not to be"]}).encode().ljust(64 << 10)
    raw = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw += b"".join(b"1\r\n%c\r\n" % byte for byte in body) + b"0\r\n\r\n"
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(raw)
        ((status, _, answer),) = read_answers(sock, 1)
    assert status == 200 and len(json.loads(answer)["results"]) == 1
    assert time.monotonic() - started < 5
    server.check()


# --------------------------------------------------------------------------- Expect


def test_expect_100_continue_gets_one_interim_answer(server: Watched) -> None:
    head = POST + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(PAYLOAD)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(PAYLOAD)
        ((status, answer_head, _),) = read_answers(sock, 1)
        assert status == 200 and b"100 Continue" not in answer_head
        # The body sent with the head: the client is not waiting, so no 100 Continue.
        sock.sendall(head + PAYLOAD)
        assert [status for status, _, _ in read_answers(sock, 1)] == [200]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:  # none to HTTP/1.0
        sock.sendall(head.replace(b"HTTP/1.1", b"HTTP/1.0"))
        with pytest.raises(TimeoutError):
            sock.settimeout(0.5)
            sock.recv(100)
        sock.settimeout(10)
        sock.sendall(PAYLOAD)
        assert [status for status, _, _ in answers_until_closed(sock)] == [200]
    server.check()


# --------------------------------------------------------------------------- without a server


def test_accept_out_of_descriptors_pauses_accepting_instead_of_ending_the_worker() -> None:
    worker = GracefulThreadWorker.__new__(GracefulThreadWorker)
    worker.nr_conns, worker.worker_connections, worker.alive = 3, 100, True
    worker.log = mock.Mock()
    listener = mock.Mock()
    listener.accept.side_effect = OSError(errno.EMFILE, "Too many open files")
    worker.accept(listener)
    assert worker.worker_connections == 3  # not accepting for now
    worker.accept_paused_until = 0.0
    assert worker.worker_connections == 100
    worker.accept(listener)  # fails again: still logged once
    assert worker.log.warning.call_count == 1 and worker.accept_failing
    listener.accept.side_effect = [BlockingIOError(errno.EAGAIN, "again")]
    worker.accept_paused_until = 0.0
    worker.accept(listener)
    listener.accept.side_effect = OSError(errno.EBADF, "Bad file descriptor")  # anything else is a fault
    with pytest.raises(OSError):
        worker.accept(listener)


def test_the_parser_is_the_version_pinned() -> None:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [dep for dep in dependencies if dep.startswith("h11==")]
    assert h11.__version__ == pin.removeprefix("h11==")
