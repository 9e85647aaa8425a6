"""The gunicorn worker class: gunicorn's threaded worker, reading and parsing every request whole in its
event loop before a request thread sees it, answering overload at once, refusing new work promptly on
SIGTERM and spreading connections evenly over the workers."""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import json
import math
import multiprocessing
import os
import selectors
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

from service import lifecycle
from service.framing import Limits, PendingRequest, Refused, WSGIRequest
from service.schemas import ErrorResponse
from service.settings import Settings

# One row per worker slot: pid (0 for a free slot, -1 while its worker starts), open connections,
# and the time.monotonic() (one clock for every process) of its event loop's last turn.
PID, CONNECTIONS, HEARTBEAT = range(3)
FIELDS = 3
STALE_SECONDS = 2.0  # a peer whose loop has not turned for this long (stuck or dying) is left out
DEFER_POLL_SECONDS = 0.01  # how often a worker that leaves connections to its peers looks again
# A worker leaves new connections to a peer with fewer than n - n // BALANCE_TOLERANCE of its n: exact
# below 16 connections, and hundreds (a burst) are accepted in runs of n/16 rather than one or two at a
# time, each waiting up to DEFER_POLL_SECONDS for the peer to look again.
BALANCE_TOLERANCE = 16

CRLF = "\r\n"
READ_SIZE = 1 << 16  # bytes read from a client per readiness event
SWEEP_SECONDS = 0.25  # how often the loop looks for requests past their deadline
LINGER_SECONDS = 5.0  # after an error answer that closes, unread request bytes are drained this long at most
LINGER_MAX_BYTES = 64 << 20  # ... and up to this much, so that the client reads the answer, not a reset
# /healthz and /readyz (the kubelet's probes) and /metrics (the scraper) have threads of their own, so that
# neither waits behind model work, and probes do not wait behind a flood of /metrics either. Each pool's
# queue is bounded; beyond it the loop answers 503 and closes. A probe answers in about a millisecond and a
# refused one is a failed probe, so its bound is far above what the kubelet sends yet keeps the longest wait
# well within a probe's 1 s timeout; scrapers come every few seconds and retry.
HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
PROBE_THREADS = {"health": 2, "metrics": 1}
PROBE_MAX_WAITING = {"health": 256, "metrics": 8}
# accept() failing for want of descriptors or memory: the loop stops accepting this long, then tries again
# (the connections wait in the listen queue), instead of the worker exiting.
ACCEPT_PAUSE_SECONDS = 0.5
ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

COLD_QUEUE = 64  # requests that may wait before a rate is measured (at least; 4 per thread where more)
MAX_RETRY_AFTER = 30.0  # seconds: the most a 503's Retry-After says
MAX_QUEUED = 4096  # model requests one worker holds waiting at most, whatever the wait estimate says
THROUGHPUT_WINDOW_SECONDS = 2.0  # the answering rate is measured over the completions this recent
PRIORITIES = {"interactive": 0, "batch": 1}  # the order the queue serves them in
OPTIONS_PEEK_BYTES = 64 << 10  # bodies up to this size are looked at for `priority` and `timeout`


@dataclass(eq=False)
class Queued:
    """A complete model request waiting in the loop for a request thread."""

    conn: TConn
    request: WSGIRequest
    leftover: bytes  # what the client pipelined behind it
    arrived: float  # time.monotonic() when it was complete
    deadline: float | None  # its own timeout, from its arrival
    size: int = 0  # its body's bytes, counted in the worker's buffer budget while it waits
    gone: bool = False  # the client closed the connection meanwhile
    watched: bool = True  # registered with the poller for the client going away


class Throughput:
    """How fast this worker has been answering model requests: completions per second over the last
    THROUGHPUT_WINDOW_SECONDS, and so how long a request with `n` ahead of it can expect to wait."""

    def __init__(self, cold_queue: int) -> None:
        self.cold_queue = cold_queue  # until a rate is measured, this many may wait whatever the budget
        self.done: collections.deque[float] = collections.deque(maxlen=4096)

    def record(self, now: float) -> None:
        self.done.append(now)

    def rate(self, now: float) -> float | None:
        while self.done and now - self.done[0] > THROUGHPUT_WINDOW_SECONDS:
            self.done.popleft()
        if len(self.done) < 8:
            return None  # too few answers to tell (a burst on an idle worker)
        return len(self.done) / max(now - self.done[0], 0.05)

    def expected_wait(self, position: int, now: float) -> float:
        """Seconds until the request at `position` in the queue gets a thread; before a rate is measured,
        none up to `cold_queue` requests and unbounded beyond (so that a burst on an idle worker neither
        waits without bound nor is refused for want of a measurement)."""
        rate = self.rate(now)
        if rate is None:
            return 0.0 if position <= self.cold_queue else math.inf
        return position / rate


def request_options(request: WSGIRequest) -> tuple[int, float | None]:
    """A model request's priority rank and timeout, read from its JSON body where it names them; anything
    unreadable counts as not given (the app's validation answers it)."""
    body = request.body
    if body.getbuffer().nbytes > OPTIONS_PEEK_BYTES:
        return PRIORITIES["interactive"], None
    raw = body.getvalue()
    if b'"priority"' not in raw and b'"timeout"' not in raw:
        return PRIORITIES["interactive"], None
    try:
        fields = json.loads(raw)
    except ValueError:
        return PRIORITIES["interactive"], None
    if not isinstance(fields, dict):
        return PRIORITIES["interactive"], None
    priority = fields.get("priority")
    rank = PRIORITIES.get(priority, PRIORITIES["interactive"]) if isinstance(priority, str) else 0
    timeout = fields.get("timeout")
    if isinstance(timeout, int | float) and not isinstance(timeout, bool) and 0 < timeout <= 3600:
        return rank, float(timeout)
    return rank, None


_table: Any = None  # shared memory (multiprocessing.RawArray), created by the master before it forks


def create_connection_table(slots: int) -> None:
    """Called once in the master (gunicorn.conf.py), so that every forked worker shares the table."""
    global _table
    _table = multiprocessing.RawArray("d", slots * FIELDS)


def claim_slot(worker: Any) -> None:
    """In the master, before `worker` forks: a free row for it (the slots outnumber the workers)."""
    if _table is None:
        return
    for slot in range(len(_table) // FIELDS):
        if _table[slot * FIELDS + PID] == 0:
            _table[slot * FIELDS + PID] = -1
            _table[slot * FIELDS + CONNECTIONS] = 0
            _table[slot * FIELDS + HEARTBEAT] = time.monotonic()
            worker.connection_slot = slot
            return


def release_slot(worker: Any) -> None:
    """In the master, when `worker` has exited."""
    slot = getattr(worker, "connection_slot", None)
    if _table is not None and slot is not None:
        _table[slot * FIELDS + PID] = 0


def _error_answer(status: int, reason: str, message: str, type_: str, code: str, *, head_only: bool = False,
                  headers: str = "") -> bytes:  # fmt: skip
    """A whole HTTP answer carrying the API's error envelope (the app's ErrorResponse), for the answers
    the event loop gives without the app, each closing the connection; `headers`: extra lines, each
    ending CRLF."""
    body = json.dumps(ErrorResponse.of(message, type_, code=code)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{headers}Connection: close\r\n\r\n"
    )
    return head.encode() + (b"" if head_only else body)


class _CapturedAnswer:
    """Stands in for the client socket while gunicorn writes its error page, to learn its status line."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float | None:
        return None

    def setblocking(self, flag: bool) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.data += data

    send = sendall

    def status_line(self) -> str:
        return self.data.split(b"\r\n", 1)[0].decode("latin-1").removeprefix("HTTP/1.1 ")


class GracefulThreadWorker(ThreadWorker):
    """gthread, with four changes.

    Requests are read and parsed whole in the event loop. Stock gthread hands a connection to a request
    thread as soon as its first byte arrives, and the thread then blocks reading the rest: a few dozen
    clients that send headers and trickle a body held every thread, probes included. Here the loop feeds
    each request's bytes to h11 as they arrive (service/framing.py), with a total deadline for the head
    and another for the body (408, then close); only a parsed request with its complete body reaches a
    thread, which never reads the socket. A slow client costs a socket and its buffer, and the bodies
    being read share a budget per worker (MAX_BUFFERED_BYTES). Every answer the loop gives itself (400,
    408, 413, 414, 417, 431, 503, ...) closes the connection, so nothing of a refused request is ever read
    as the next one.

    Overload is answered at once. A complete model request that finds every request thread busy waits
    in the loop's queue, which costs no thread, if the wait it can expect (the requests ahead of it over
    the rate the worker has been answering at) is within QUEUE_WAIT_SECONDS and its own `timeout`;
    otherwise it gets 503 with a Retry-After from that estimate at once. Interactive requests are served
    before batch ones; one still queued at its timeout gets 504 from the loop, without computing.
    /healthz and /readyz run on threads of their own, /metrics on another, each with a short queue, so
    a probe never waits behind model work or a flood of scrapes. A response write (a piece of a stream,
    or a whole answer) not sent within WRITE_TIMEOUT_SECONDS (a client that stopped reading) closes the
    connection, which frees the thread and cancels the generation. Connections are closed without
    blocking the loop (gthread's graceful close waited up to 2 s in it for each client that did not close
    its end).

    On SIGTERM the stock worker stops polling its listening sockets but keeps them open until its
    in-flight requests finish, so the kernel goes on queueing new connections that nobody will answer:
    clients hang for up to the graceful timeout and are then reset. Closing the listeners as soon as the
    worker stops accepting makes new connections fail at once (the master has already closed its copy),
    which lets a client or load balancer retry elsewhere while streams in progress run to their end.

    The workers share one listening socket, and whichever wakes first accepts: a burst of new
    connections often all went to one worker (all 8 of a client's keep-alive connections, in 4 of
    12 tries), which then did all the work of that client while the other core idled. Here a worker
    publishes its open connections in shared memory and leaves new ones to a live peer that has
    fewer, so that the kernel's queue is served by the least busy worker.
    """

    connection_slot: int | None = None
    accept_paused_until = 0.0  # accept() failed for want of resources: not accepting until then
    accept_failing = False  # ... and it has not succeeded since (logged once per such spell)

    def init_process(self) -> None:
        if _table is not None and self.connection_slot is not None:
            _table[self.connection_slot * FIELDS + PID] = os.getpid()
        settings = Settings()
        self.limits = Limits(
            max_header_bytes=settings.max_header_bytes,
            max_request_line=self.cfg.limit_request_line or 8190,  # gunicorn's meaning of 0: its maximum
            max_field_bytes=self.cfg.limit_request_field_size or 8190,
            max_fields=self.cfg.limit_request_fields or 32768,
            max_body_bytes=settings.max_body_bytes,
        )
        self.max_buffered = settings.max_buffered_bytes
        self.header_timeout = settings.header_timeout_seconds
        self.body_timeout = settings.body_timeout_seconds
        self.write_timeout = settings.write_timeout_seconds
        self.queue_wait = settings.queue_wait_seconds
        self.queue: list[tuple[int, int, Queued]] = []  # model requests waiting for a thread: a heap
        self.queued_seq = 0
        self.throughput = Throughput(cold_queue=max(4 * self.cfg.threads, COLD_QUEUE))
        self.queued_bytes = 0  # bodies of the queued requests, within max_buffered with those being read
        self.reading: dict[TConn, PendingRequest] = {}
        self.reserved: dict[TConn, int] = {}  # body bytes held for each connection being read
        self.buffered = 0  # their sum, within max_buffered
        self.lingering: dict[TConn, tuple[float, int]] = {}  # closing connections: deadline, bytes drained
        self.admitted = 0  # model requests handed to the request threads and not yet finished
        self.probes_admitted = dict.fromkeys(PROBE_THREADS, 0)  # the same, per probe pool
        self.read_failures = 0
        self.next_sweep = 0.0
        self.probe_pools = {
            kind: ThreadPoolExecutor(max_workers=threads, thread_name_prefix=kind)
            for kind, threads in PROBE_THREADS.items()
        }
        # Imported here, after gunicorn.conf.py has set PROMETHEUS_MULTIPROC_DIR.
        from service import metrics

        self.metrics = metrics
        super().init_process()

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM: set the drain deadline (service.lifecycle), by which the generations still running end
        with finish_reason "shutdown", a margin before gunicorn stops this worker; then gunicorn's own stop."""
        lifecycle.begin_shutdown(self.cfg.graceful_timeout)
        super().handle_exit(sig, frame)

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()
            if _table is not None and self.connection_slot is not None:
                _table[self.connection_slot * FIELDS + HEARTBEAT] = 0.0  # peers stop leaving connections to it

    def accept(self, listener: socket.socket) -> None:
        """Every connection waiting in the listen queue, up to the cap, rather than gthread's one per loop
        turn: under a burst, a loop turn can wait milliseconds for the GIL, and a probe queued behind
        hundreds of connections would wait that long for each of them. Out of descriptors or memory, it
        stops accepting for a while rather than let the error end the worker."""
        while self.nr_conns < self.worker_connections:
            before = self.nr_conns
            try:
                super().accept(listener)
            except OSError as exc:
                if exc.errno not in ACCEPT_RESOURCE_ERRORS:
                    raise
                self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE_SECONDS
                if not self.accept_failing:
                    self.accept_failing = True
                    self.log.warning(
                        "accept failed (%s) with %d connections open: accepting again in %g s, and so on until "
                        "it succeeds", os.strerror(exc.errno or 0), self.nr_conns, ACCEPT_PAUSE_SECONDS,
                    )  # fmt: skip
                return
            if self.nr_conns == before:  # nothing more to accept (EAGAIN)
                return
            self.accept_failing = False

    # ------------------------------------------------------------------ reading requests in the loop

    def enqueue_req(self, conn: TConn) -> None:
        """Called for a new connection, a kept-alive one that became readable, and one whose previous
        request was followed by pipelined bytes: read its next request here before any thread sees it."""
        if self.cfg.is_ssl:  # TLS is terminated in front of the service; encrypted bytes cannot be parsed here
            super().enqueue_req(conn)
            return
        pipelined = getattr(conn, "pipelined", b"")
        conn.pipelined = b""
        conn.sock.setblocking(False)
        self.reading[conn] = PendingRequest(self.limits, time.monotonic(), self.cfg, conn.client)
        self.reserved[conn] = 0
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
        if pipelined:
            self._advance(conn, pipelined)
        else:  # the request has often arrived already: read it now rather than a loop turn later
            self._on_readable(conn, conn.sock)

    @staticmethod
    def _receive(conn: TConn) -> bytes | None:
        """What the client sent since the last read: None if nothing yet, b"" once it has closed."""
        try:
            return conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    def _on_readable(self, conn: TConn, _sock: socket.socket) -> None:
        if (data := self._receive(conn)) is None:
            return
        if not data:  # the client went away before its request was complete
            self._stop_reading(conn)
            self._close(conn)
            return
        self._advance(conn, data)

    def _advance(self, conn: TConn, data: bytes) -> None:
        """Feed what arrived to the connection's parser; refuse, wait for more, or hand the request over."""
        pending = self.reading[conn]
        try:
            complete = pending.feed(data, time.monotonic())
            within_budget = self._reserve(conn, pending.body_bytes)  # what is held, not what is announced
        except Refused as refusal:
            self._stop_reading(conn)
            self.metrics.REQUESTS_REFUSED.labels(refusal.label).inc()
            self._answer_and_close(conn, refusal.status, refusal.reason, refusal.message, refusal.code)
            return
        except Exception as exc:  # a fault of this code, not the client's: the worker must live on
            self.read_failures += 1
            if self.read_failures == 1:
                self.log.exception("reading a request from %s failed; answered 400", conn.client)
            else:
                self.log.warning("reading a request from %s failed (%r); answered 400", conn.client, exc)
            self._stop_reading(conn)
            self.metrics.REQUESTS_REFUSED.labels("unreadable").inc()
            self._answer_and_close(conn, 400, "Bad Request", "the request could not be read", "bad_request")
            return
        if not within_budget:
            self._stop_reading(conn)
            self.metrics.REQUESTS_REFUSED.labels("buffers_full").inc()
            message = f"the server holds {self.buffered >> 20} MiB of request bodies; retry in a second"
            self._answer_busy(conn, message, head_only=pending.request is not None and pending.request.method == "HEAD")
            return
        if not complete:
            if pending.wants_continue:
                pending.continue_sent = True
                self._send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        self._stop_reading(conn)
        try:
            self._dispatch(conn, pending)
        except Exception:  # a fault of this code: the request fails, the worker lives on
            self.log.exception("dispatching a request from %s failed", conn.client)
            with contextlib.suppress(OSError):
                self._send(conn, _error_answer(500, "Internal Server Error", "internal server error",
                                               "server_error", "internal_error"))  # fmt: skip
            self._close(conn)

    def _reserve(self, conn: TConn, size: int) -> bool:
        """Hold `size` bytes of the budget for the body `conn` is sending (its Content-Length at once, a
        chunked body as it grows); whether it fits."""
        held = self.reserved[conn]
        if size > held:
            if self.buffered - held + size + self.queued_bytes > self.max_buffered:
                return False
            self.buffered += size - held
            self.reserved[conn] = size
        return True

    def _stop_reading(self, conn: TConn) -> None:
        del self.reading[conn]
        self.buffered -= self.reserved.pop(conn)
        self.poller.unregister(conn.sock)

    def _dispatch(self, conn: TConn, pending: PendingRequest) -> None:
        """Hand a complete request to a thread of its pool, or answer 503 and close when too many already
        wait for one."""
        request = pending.request
        assert request is not None
        kind = None
        if request.method in ("GET", "HEAD") and not pending.body_bytes:  # a probe with a body is no probe
            kind = "health" if request.path in HEALTH_PATHS else "metrics" if request.path == "/metrics" else None
        if kind is None:
            self._admit(conn, pending, request)
            return
        else:
            if self.probes_admitted[kind] >= PROBE_THREADS[kind] + PROBE_MAX_WAITING[kind]:
                self.metrics.REQUESTS_REFUSED.labels("probes_waiting").inc()
                message = f"too many {request.path} requests are waiting; retry in a second"
                self._answer_busy(conn, message, head_only=request.method == "HEAD")
                return
            self.probes_admitted[kind] += 1
            pool = self.probe_pools[kind]
        conn.parsed_request = request
        conn.pipelined = pending.leftover()
        future = pool.submit(self.handle, conn)
        future.add_done_callback(lambda done: self.method_queue.defer(self._finished, conn, done, kind))

    def _finished(self, conn: TConn, future: Future[Any], kind: str | None) -> None:
        if kind is None:
            self.admitted -= 1
            self.throughput.record(time.monotonic())
        else:
            self.probes_admitted[kind] -= 1
        self.finish_request(conn, future)
        if kind is None:
            self._serve_queue()

    # ------------------------------------------------------------------ model requests: admission

    def _admit(self, conn: TConn, pending: PendingRequest, request: WSGIRequest) -> None:
        """A thread now if one is free and nobody waits; else a place in the queue (held by the loop, costing
        no thread) if the wait it can expect is within its budget; else 503 with Retry-After at once."""
        now = time.monotonic()
        priority, timeout = request_options(request)
        arrived = pending.headers_done_at or now
        if self.admitted < self.cfg.threads and not self.queue and not lifecycle.draining(now):
            self._submit_model_request(conn, request, pending.leftover(), arrived)
            return
        ahead = sum(1 for rank, _, _ in self.queue if rank <= priority)
        budget = self.queue_wait if timeout is None else min(self.queue_wait, timeout)
        wait = self.throughput.expected_wait(ahead + 1, now)
        size = request.body.getbuffer().nbytes
        if self.buffered + self.queued_bytes + size > self.max_buffered:
            self.metrics.REQUESTS_REFUSED.labels("buffers_full").inc()
            message = f"the server holds {(self.buffered + self.queued_bytes) >> 20} MiB of requests; retry"
            self._answer_busy(conn, message, head_only=request.method == "HEAD")
            return
        if budget <= 0 or wait > budget or len(self.queue) >= MAX_QUEUED:
            self.metrics.REQUESTS_REFUSED.labels("overloaded").inc()
            retry = min(wait, MAX_RETRY_AFTER)
            message = (
                f"the server is busy: {len(self.queue)} requests are waiting, more than the {budget:g} s this one "
                f"may wait; retry in {math.ceil(max(retry, 1.0))} s"
            )
            self._answer_busy(conn, message, head_only=request.method == "HEAD", retry_after=retry)
            return
        self.queued_seq += 1
        entry = Queued(conn, request, pending.leftover(), arrived, None if timeout is None else arrived + timeout)
        heapq.heappush(self.queue, (priority, self.queued_seq, entry))
        self.queued_bytes += size
        entry.size = size
        self._hold(conn, entry)

    def _hold(self, conn: TConn, entry: Queued) -> None:
        """While it waits, the connection is watched only for the client going away."""
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_queued_readable, entry))

    def _on_queued_readable(self, entry: Queued, _sock: socket.socket) -> None:
        """A queued request's client sent more (pipelined, kept for later) or closed: a closed one leaves."""
        try:
            data = entry.conn.sock.recv(READ_SIZE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:  # pipelined bytes wait in the kernel for their turn; stop watching until then
            self.poller.unregister(entry.conn.sock)
            entry.watched = False
            return
        entry.gone = True
        self.queued_bytes -= entry.size
        self.poller.unregister(entry.conn.sock)
        entry.watched = False
        self._close(entry.conn)

    def _serve_queue(self) -> None:
        """Give free threads to the queue's first requests, answering those past their time from the loop."""
        now = time.monotonic()
        while self.queue and (self.admitted < self.cfg.threads or lifecycle.draining(now)):
            _, _, entry = heapq.heappop(self.queue)
            if entry.gone:
                continue
            self.queued_bytes -= entry.size
            if entry.watched:
                self.poller.unregister(entry.conn.sock)
                entry.watched = False
            if self._expire(entry, now):
                continue
            self._submit_model_request(entry.conn, entry.request, entry.leftover, entry.arrived)

    def _expire(self, entry: Queued, now: float) -> bool:
        """Answer a queued request that can no longer be served in time; whether it was."""
        if lifecycle.draining(now):
            self.metrics.REQUESTS_REFUSED.labels("shutting_down").inc()
            self._answer_busy(entry.conn, "the server is shutting down; retry", entry.request.method == "HEAD",
                              code="shutting_down")  # fmt: skip
            return True
        if entry.deadline is not None and now >= entry.deadline:
            self.metrics.REQUESTS_REFUSED.labels("timeout").inc()
            message = f"the request waited {now - entry.arrived:.2f} s for the model, past its timeout"
            answer = _error_answer(504, "Gateway Timeout", message, "timeout", "timeout",
                                   head_only=entry.request.method == "HEAD")  # fmt: skip
            if self._send(entry.conn, answer):
                self._close_lingering(entry.conn)
            else:
                self._close(entry.conn)
            return True
        return False

    def _expire_queued(self, now: float) -> None:
        """The sweep: queued requests past their timeout (or the drain deadline) leave the queue now."""
        if not self.queue:
            return
        kept = []
        for item in self.queue:
            entry = item[2]
            if entry.gone:
                continue
            if (entry.deadline is not None and now >= entry.deadline) or lifecycle.draining(now):
                self.queued_bytes -= entry.size
                if entry.watched:
                    self.poller.unregister(entry.conn.sock)
                    entry.watched = False
                self._expire(entry, now)
                continue
            kept.append(item)
        if len(kept) != len(self.queue):
            heapq.heapify(kept)
            self.queue = kept

    def _submit_model_request(self, conn: TConn, request: WSGIRequest, leftover: bytes, arrived: float) -> None:
        self.admitted += 1
        request.arrived = arrived
        conn.parsed_request = request
        conn.pipelined = leftover
        future = self.tpool.submit(self.handle, conn)
        future.add_done_callback(lambda done: self.method_queue.defer(self._finished, conn, done, None))

    # ------------------------------------------------------------------ answers written by the loop

    def _send(self, conn: TConn, data: bytes) -> bool:
        """Write a short answer without blocking; whether all of it went out."""
        try:
            return conn.sock.send(data) == len(data)
        except OSError:
            return False

    def _answer_busy(self, conn: TConn, message: str, head_only: bool, retry_after: float = 1.0,
                     code: str = "overloaded") -> None:  # fmt: skip
        """503 with Retry-After (whole seconds, at least 1), then a close (lingering where the client sent
        more): what the client pipelined behind is not read."""
        answer = _error_answer(
            503, "Service Unavailable", message, "service_unavailable", code,
            head_only=head_only, headers=f"Retry-After: {math.ceil(max(retry_after, 1.0))}" + CRLF,
        )  # fmt: skip
        if not self._send(conn, answer) or self._nothing_unread(conn):
            self._close(conn)  # nothing unread: the close sends FIN, not a reset, so no lingering is needed
        else:
            self._close_lingering(conn)

    @staticmethod
    def _nothing_unread(conn: TConn) -> bool:
        """Whether the client has sent nothing the loop has not read (shedding is then cheap: no lingering)."""
        try:
            return not conn.sock.recv(1, socket.MSG_PEEK)  # b"": the client closed its end
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return True

    def _answer_and_close(self, conn: TConn, status: int, reason: str, message: str, code: str) -> None:
        """An error answer, then a lingering close: what the client still sends is read and dropped for
        a while, so that its kernel gets no reset before it has read the answer."""
        self._send(conn, _error_answer(status, reason, message, "invalid_request_error", code))
        self._close_lingering(conn)

    def _close_lingering(self, conn: TConn) -> None:
        """Send FIN, then drop what the client still sends until it closes too or LINGER_SECONDS pass, in
        the loop. (gthread's own graceful close waits for that in the loop's thread, up to 2 s a
        connection: a client that never closes stalled every other connection of the worker meanwhile.)"""
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        self.lingering[conn] = (time.monotonic() + LINGER_SECONDS, 0)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_lingering_readable, conn))

    def finish_request(self, conn: TConn, fs: Future[Any]) -> None:
        """gthread's, in the loop's thread when a request thread is done: read the next request (pipelined
        already, or on a kept-alive connection), or close without blocking the loop."""
        if self.cfg.is_ssl:
            super().finish_request(conn, fs)
            return
        try:
            keep_alive = not fs.cancelled() and fs.result() is True
        except Exception:
            keep_alive = False
        if not keep_alive:
            conn.pipelined = b""
            self._close_lingering(conn)
        elif conn.pipelined:  # the client pipelined its next request
            self.enqueue_req(conn)
        else:
            try:
                conn.sock.setblocking(False)
                self._keep_alive(conn)
            except (OSError, ValueError):  # the socket is gone
                self._close(conn)

    def _keep_alive(self, conn: TConn) -> None:
        """Wait in the loop, up to KEEPALIVE_SECONDS, for the connection's next request."""
        conn.set_timeout()
        if not self.alive:  # a stopping worker keeps it only briefly, as gthread does
            conn.timeout = min(conn.timeout, time.monotonic() + STOP_KEEPALIVE_LINGER)
        self.keepalived_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))

    def _on_lingering_readable(self, conn: TConn, _sock: socket.socket) -> None:
        deadline, drained = self.lingering[conn]
        if (data := self._receive(conn)) is None:
            return
        if data and drained + len(data) < LINGER_MAX_BYTES:
            self.lingering[conn] = (deadline, drained + len(data))
            return
        self._end_lingering(conn)

    def _end_lingering(self, conn: TConn) -> None:
        del self.lingering[conn]
        self.poller.unregister(conn.sock)
        self._close(conn)

    def _close(self, conn: TConn) -> None:
        self.nr_conns -= 1
        conn.close()

    # ------------------------------------------------------------------ deadlines, once per loop turn

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        if now < self.next_sweep:
            return
        self.next_sweep = now + SWEEP_SECONDS
        for conn, pending in list(self.reading.items()):
            if not pending.has_started:  # nothing sent yet (or empty lines only)
                if now - pending.started > self.header_timeout or not self.alive:
                    # No answer: a client that has not sent a request would take one for the answer to its next.
                    self._stop_reading(conn)
                    self.metrics.CONNECTIONS_TIMED_OUT.labels("idle").inc()
                    self._close(conn)
                continue
            if pending.headers_done_at is None:
                phase, late = "headers", now - pending.started > self.header_timeout
            else:
                phase, late = "body", now - pending.headers_done_at > self.body_timeout
            if late:
                self._stop_reading(conn)
                self.metrics.CONNECTIONS_TIMED_OUT.labels(phase).inc()
                limit = self.header_timeout if phase == "headers" else self.body_timeout
                message = f"the request {phase} did not arrive within {limit:g} s"
                self._answer_and_close(conn, 408, "Request Timeout", message, "request_timeout")
        for conn, (deadline, _) in list(self.lingering.items()):
            if now > deadline:
                self._end_lingering(conn)
        self._expire_queued(now)
        self.metrics.OPEN_CONNECTIONS.set(self.nr_conns)
        self.metrics.REQUESTS_WAITING.set(len(self.queue))

    # ------------------------------------------------------------------ in the request thread

    def handle(self, conn: TConn) -> bool:
        """gthread's, for a request the loop has parsed with its whole body: nothing is read from the socket
        here, and gunicorn's parser is not used (TLS connections keep gthread's own)."""
        if self.cfg.is_ssl:
            return bool(super().handle(conn))
        req, conn.parsed_request = conn.parsed_request, None
        lifecycle.set_arrival(getattr(req, "arrived", None))
        try:
            return self.handle_request(req, conn)
        except StopIteration as exc:
            self.log.debug("Closing connection. %s", exc)
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.debug("Ignoring %s", errno.errorcode[exc.errno])
            else:
                self.log.exception("Socket error processing request.")
        except Exception as exc:
            self.handle_error(req, conn.sock, conn.client, exc)
        return False

    def handle_request(self, req: Any, conn: TConn) -> bool:
        """gthread's, with a bound on every write: a write not sent within WRITE_TIMEOUT_SECONDS (a client
        that stopped reading) loses the connection instead of holding this thread."""
        conn.sock.settimeout(self.write_timeout)
        try:
            return bool(super().handle_request(req, conn))
        except TimeoutError as exc:
            if exc.args != ("timed out",):  # not the socket's: the app's own, which gunicorn reports as usual
                raise
            self.metrics.CONNECTIONS_TIMED_OUT.labels("write").inc()
            self.log.info("closed a connection from %s: a write was not sent in %g s", conn.client, self.write_timeout)
            raise StopIteration from None

    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: BaseException) -> None:
        """gunicorn's answer to what escaped a request (and, over TLS, to what its parser refused), in the
        API's JSON error envelope instead of gunicorn's HTML page."""
        page = _CapturedAnswer()
        super().handle_error(req, page, addr, exc)
        status, _, reason = page.status_line().partition(" ")
        if not status.isdigit():
            return
        message = f"{reason}: {exc}" if str(exc) and int(status) < 500 else reason
        type_ = "invalid_request_error" if int(status) < 500 else "server_error"
        code = reason.lower().replace(" ", "_")
        try:
            client.setblocking(False)
            client.send(_error_answer(int(status), reason, message, type_, code))
        except OSError:
            self.log.debug("Failed to send error message.")

    # ------------------------------------------------------------------ connection balancing

    # gthread's loop accepts while `nr_conns < worker_connections`, re-evaluated at every turn.
    @property  # type: ignore[override]
    def worker_connections(self) -> int:
        if self._leave_to_peer() or time.monotonic() < self.accept_paused_until:
            return self.nr_conns  # stop accepting for now
        return self._worker_connections

    @worker_connections.setter
    def worker_connections(self, value: int) -> None:
        self._worker_connections = value

    def _leave_to_peer(self) -> bool:
        """Publish this worker's connections; whether a live peer has fewer."""
        slot = self.connection_slot
        if _table is None or slot is None or not self.alive:
            return False
        now = time.monotonic()
        _table[slot * FIELDS + CONNECTIONS] = self.nr_conns
        _table[slot * FIELDS + HEARTBEAT] = now
        for peer in range(len(_table) // FIELDS):
            row = peer * FIELDS
            if peer == slot or _table[row + PID] <= 0 or now - _table[row + HEARTBEAT] > STALE_SECONDS:
                continue
            if _table[row + CONNECTIONS] < self.nr_conns - self.nr_conns // BALANCE_TOLERANCE:
                return True
        return False

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        # A worker that is not accepting only wakes for its own connections' events, which may be
        # seconds apart: while it leaves new connections to a peer it looks again every few ms.
        if not self._accepting and self.alive:
            timeout = min(timeout, DEFER_POLL_SECONDS)
        super().wait_for_and_dispatch_events(timeout)

    def run(self) -> None:
        try:
            super().run()
        finally:
            for pool in self.probe_pools.values():
                pool.shutdown(wait=False)
