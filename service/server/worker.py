"""The gunicorn worker class: gunicorn's threaded worker, reading and parsing every request whole in its
event loop before a request thread sees it, answering overload at once, refusing new work promptly on
SIGTERM and spreading connections evenly over the workers."""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from gunicorn.workers.gthread import TConn

from service import lifecycle
from service.api.inference_protocol import is_protocol_path
from service.server import connection_balancing
from service.server.admission import AdmissionQueue, Queued, request_options
from service.server.loop_answers import error_answer
from service.server.loop_reading import READ_SIZE, LoopReadingWorker
from service.server.request_framing import Limits, PendingRequest, WSGIRequest
from service.settings import Settings

# /healthz and /readyz (the kubelet's probes) and /metrics (the scraper) have threads of their own, so that
# neither waits behind model work, and probes do not wait behind a flood of /metrics either. Each pool's
# queue is bounded; beyond it the loop answers 503 and closes. A probe answers in about a millisecond and a
# refused one is a failed probe, so its bound is far above what the kubelet sends yet keeps the longest wait
# well within a probe's 1 s timeout; scrapers come every few seconds and retry.
HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
PROBE_THREADS = {"health": 2, "metrics": 1}
PROBE_MAX_WAITING = {"health": 256, "metrics": 8}
# accept() failing for want of descriptors or memory: the loop stops accepting this long, then tries again
# (the connections wait in the listen queue), instead of the worker exiting.
ACCEPT_PAUSE_SECONDS = 0.5
ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class GracefulThreadWorker(LoopReadingWorker):
    """gthread, with four changes (docs/architecture.md, "The worker", says why each): requests are read
    whole in the event loop (LoopReadingWorker); a model request that finds every thread busy waits in the
    loop's queue, which costs no thread, or gets 503 at once by its expected wait (AdmissionQueue), and
    probes have threads of their own; on SIGTERM the listeners close at once; and new connections go to
    the worker with the fewest (connection_balancing)."""

    connection_slot: int | None = None
    accept_paused_until = 0.0  # accept() failed for want of resources: not accepting until then
    accept_failing = False  # ... and it has not succeeded since (logged once per such spell)
    grpc_server: Any = None  # the worker's gRPC server (service.server.grpc_server), if it runs one
    grpc_stopped: Any = None  # set once it is stopping: when its last call has ended

    def init_process(self) -> None:
        connection_balancing.set_pid(self.connection_slot, os.getpid())
        settings: Settings = self.app.wsgi().extensions["models"].settings  # the app's, read once
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
        self.queue = AdmissionQueue(self.cfg.threads, settings.queue_wait_seconds)
        self.reading: dict[TConn, PendingRequest] = {}
        self.reserved: dict[TConn, int] = {}  # body bytes held for each connection being read
        self.buffered = 0  # their sum, within max_buffered
        self.lingering: dict[TConn, tuple[float, int]] = {}  # closing connections: deadline, bytes drained
        self.paused: dict[TConn, float] = {}  # kept open after an overload 503, unread until its Retry-After
        self.admitted = 0  # model requests handed to the request threads and not yet finished
        self.probes_admitted = dict.fromkeys(PROBE_THREADS, 0)  # the same, per probe pool
        self.read_failures = 0
        self.loop_failures = 0
        self.next_sweep = 0.0
        self.probe_pools = {
            kind: ThreadPoolExecutor(max_workers=threads, thread_name_prefix=kind)
            for kind, threads in PROBE_THREADS.items()
        }
        # Imported here, after gunicorn.conf.py has set PROMETHEUS_MULTIPROC_DIR.
        from service import metrics

        self.metrics = metrics
        from service.server.grpc_server import start_grpc_server  # gRPC only after the fork

        app = self.app.wsgi()
        self.grpc_server = start_grpc_server(app.extensions["models"], app.extensions["keys"])
        super().init_process()

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM: set the drain deadline (service.lifecycle), by which the generations still running end
        with finish_reason "shutdown", a margin before gunicorn stops this worker; then gunicorn's own stop."""
        lifecycle.begin_shutdown(self.cfg.graceful_timeout)
        if self.grpc_server is not None:
            self.grpc_stopped = self.grpc_server.stop(grace=self.cfg.graceful_timeout)
        super().handle_exit(sig, frame)

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()
            connection_balancing.mark_stopping(self.connection_slot)

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
                self._answer_busy(conn, message, head_only=request.method == "HEAD", path=request.path)
                return
            self.probes_admitted[kind] += 1
            pool = self.probe_pools[kind]
        conn.parsed_request = request
        conn.pipelined = pending.leftover()
        future = pool.submit(self.handle, conn)
        future.add_done_callback(lambda done: self.method_queue.defer(self._finished, conn, done, kind))

    def _finished(self, conn: TConn, future: Future[Any], kind: str | None) -> None:
        """In the loop, when a request thread is done with `conn`. It never raises: it runs among the method
        queue's callbacks, which a failure would cut short, and the queue must be served whatever happens."""
        if kind is None:
            self.admitted -= 1
            self.queue.throughput.record(time.monotonic())
        else:
            self.probes_admitted[kind] -= 1
        try:
            self.finish_request(conn, future)
        except Exception:
            self._failed(f"finishing a request from {conn.client}", conn)
        finally:
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
        size = request.body.getbuffer().nbytes
        if self.buffered + self.queue.bytes + size > self.max_buffered:
            self.metrics.REQUESTS_REFUSED.labels("buffers_full").inc()
            message = f"the server holds {(self.buffered + self.queue.bytes) >> 20} MiB of requests; retry"
            self._answer_busy(conn, message, head_only=request.method == "HEAD", path=request.path)
            return
        refused = self.queue.refusal(priority, timeout, now)
        if refused is not None:
            self.metrics.REQUESTS_REFUSED.labels("overloaded").inc()
            message, retry = refused
            self._answer_busy(conn, message, head_only=request.method == "HEAD", retry_after=retry,
                              path=request.path, kept=request, leftover=pending.leftover())  # fmt: skip
            return
        deadline = None if timeout is None else arrived + timeout
        entry = Queued(
            conn=conn, request=request, leftover=pending.leftover(), arrived=arrived, deadline=deadline, size=size
        )
        self.queue.push(entry, priority)
        self._hold(conn, entry)

    def _hold(self, conn: TConn, entry: Queued) -> None:
        """While it waits, the connection is watched only for the client going away."""
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_queued_readable, entry))

    def _on_queued_readable(self, entry: Queued, _sock: socket.socket) -> None:
        """A queued request's client sent more (pipelined, kept for later) or closed: a closed one leaves."""
        if not entry.watched or entry.gone:
            return
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
        self.queue.leave(entry)
        self.poller.unregister(entry.conn.sock)
        entry.watched = False
        self._close(entry.conn)

    def _connection_of(self, target: Any) -> TConn | None:
        if isinstance(target, Queued):  # a failed event of a waiting request: it leaves the queue
            if not target.gone:
                self.queue.leave(target)
            target.watched = False
            return target.conn
        return super()._connection_of(target)

    def _serve_queue(self) -> None:
        """Give free threads to the queue's first requests, answering those past their time from the loop."""
        now = time.monotonic()
        while self.queue and (self.admitted < self.cfg.threads or lifecycle.draining(now)):
            entry = self.queue.pop()
            if entry is None:
                break
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
                              code="shutting_down", path=entry.request.path)  # fmt: skip
            return True
        if entry.deadline is not None and now >= entry.deadline:
            self.metrics.REQUESTS_REFUSED.labels("timeout").inc()
            message = f"the request waited {now - entry.arrived:.2f} s for the model, past its timeout"
            answer = error_answer(504, "Gateway Timeout", message, "timeout", "timeout",
                                   head_only=entry.request.method == "HEAD",
                                   protocol=is_protocol_path(entry.request.path))  # fmt: skip
            if self._send(entry.conn, answer):
                self._close_lingering(entry.conn)
            else:
                self._close(entry.conn)
            return True
        return False

    def _expire_queued(self, now: float) -> None:
        """The sweep: queued requests past their timeout (or the drain deadline) leave the queue now."""
        for entry in self.queue.take_due(now, lifecycle.draining(now)):
            if entry.watched:
                self.poller.unregister(entry.conn.sock)
                entry.watched = False
            self._expire(entry, now)

    def _submit_model_request(self, conn: TConn, request: WSGIRequest, leftover: bytes, arrived: float) -> None:
        self.admitted += 1
        request.arrived = arrived
        conn.parsed_request = request
        conn.pipelined = leftover
        future = self.tpool.submit(self.handle, conn)
        future.add_done_callback(lambda done: self.method_queue.defer(self._finished, conn, done, None))

    def _sweep(self, now: float) -> None:
        self._expire_queued(now)
        self.metrics.OPEN_CONNECTIONS.set(self.nr_conns)
        self.metrics.REQUESTS_WAITING.set(len(self.queue))
        held = self.admitted + len(self.queue)
        self.metrics.REQUESTS_IN_SYSTEM.set(held)
        self.metrics.EXPECTED_WAIT.set(self.queue.drain_seconds(held, now))

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
        """Whether a live peer has fewer connections (service.server.connection_balancing)."""
        return self.alive and connection_balancing.leave_to_peer(self.connection_slot, self.nr_conns)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        # A worker that is not accepting only wakes for its own connections' events, which may be
        # seconds apart: while it leaves new connections to a peer it looks again every few ms.
        if not self._accepting and self.alive:
            timeout = min(timeout, connection_balancing.DEFER_POLL_SECONDS)
        super().wait_for_and_dispatch_events(timeout)

    def run(self) -> None:
        try:
            super().run()
        finally:
            for pool in self.probe_pools.values():
                pool.shutdown(wait=False)
            if self.grpc_stopped is not None:  # its calls still running end by the drain deadline
                self.grpc_stopped.wait(self.cfg.graceful_timeout)
