"""The loop half of the service's gunicorn worker: every request read and parsed whole in the event loop
(service.server.request_framing) before a request thread sees it, with a deadline for its head and
another for its body; the answers the loop gives itself, each closing the connection, lingering so that
the client reads the answer rather than a reset; and the request threads' side, which never reads the
socket and bounds every write."""

from __future__ import annotations

import contextlib
import errno
import math
import selectors
import socket
import time
from concurrent.futures import Future
from functools import partial
from typing import Any

from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

from service import lifecycle
from service.api.inference_protocol import is_protocol_path
from service.server.loop_answers import CapturedAnswer, error_answer
from service.server.request_framing import Limits, PendingRequest, Refused, WSGIRequest

CRLF = "\r\n"
READ_SIZE = 1 << 16  # bytes read from a client per readiness event
SWEEP_SECONDS = 0.25  # how often the loop looks for requests past their deadline
LINGER_SECONDS = 5.0  # after an error answer that closes, unread request bytes are drained this long at most
MAX_PAUSE_SECONDS = 1.0  # after an overload 503 that keeps the connection, it is not read again for this long
LINGER_MAX_BYTES = 64 << 20  # ... and up to this much, so that the client reads the answer, not a reset


class LoopReadingWorker(ThreadWorker):
    """gthread reading requests whole in its loop; a subclass decides what to do with each (`_dispatch`)
    and sets the limits below in its init_process."""

    limits: Limits
    max_buffered: int  # MAX_BUFFERED_BYTES: bodies being read and waiting, per worker
    header_timeout: float
    body_timeout: float
    write_timeout: float
    reading: dict[TConn, PendingRequest]
    reserved: dict[TConn, int]  # body bytes held for each connection being read
    buffered: int  # their sum, within max_buffered
    lingering: dict[TConn, tuple[float, int]]  # closing connections: deadline, bytes drained
    paused: dict[TConn, float]  # kept open after an overload 503: not read again before this time.monotonic()
    read_failures: int
    loop_failures: int  # events whose callback raised (wait_for_and_dispatch_events)
    next_sweep: float
    metrics: Any  # service.metrics, imported once PROMETHEUS_MULTIPROC_DIR is set

    def _dispatch(self, conn: TConn, pending: PendingRequest) -> None:
        """A complete request, parsed with its body: give it to a thread, or answer it."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the loop's turn

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """gthread's, made safe for events that an earlier callback of the same turn made stale.

        One select() returns the events of many sockets; a callback may unregister, close or re-register
        another of them (a finished request frees a thread for a queued one, a sweep closes a connection),
        so each event runs only if its socket is still registered with the same key. A callback that fails
        anyway is logged and costs its connection, never the worker and every connection it holds."""
        try:
            events = self.poller.select(timeout)
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise
            return
        registered = self.poller.get_map()
        for key, _ in events:
            if registered.get(key.fd) is not key:
                continue  # stale: unregistered or registered anew since the select
            try:
                key.data(key.fileobj)
            except Exception:
                target = key.data.args[0] if isinstance(key.data, partial) and key.data.args else None
                # No connection: the loop's own (a listener, the method queue), which stays registered.
                self._failed(f"an event of {key.fileobj!r}", self._connection_of(target))

    def _failed(self, what: str, conn: TConn | None) -> None:
        """A loop callback raised: log it (the first with its traceback), count it, and let go of its
        connection."""
        self.loop_failures += 1
        self.metrics.LOOP_FAILURES.inc()
        log = self.log.exception if self.loop_failures == 1 else self.log.warning
        log("%s failed; its connection is closed", what)
        if conn is not None:
            self._forget(conn)

    def _connection_of(self, target: Any) -> TConn | None:
        """The connection a callback's first argument stands for (a subclass knows its own kinds)."""
        return target if isinstance(target, TConn) else None

    def _forget(self, conn: TConn) -> None:
        """After a failed event: drop every hold on the connection, then close it."""
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)
        self.buffered -= self.reserved.pop(conn, 0)
        self.reading.pop(conn, None)
        self.lingering.pop(conn, None)
        self.paused.pop(conn, None)
        with contextlib.suppress(ValueError):
            self.keepalived_conns.remove(conn)
        self._close(conn)

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
                self._send(conn, error_answer(500, "Internal Server Error", "internal server error",
                                               "server_error", "internal_error"))  # fmt: skip
            self._close(conn)

    def _reserve(self, conn: TConn, size: int) -> bool:
        """Hold `size` bytes of the budget for the body `conn` is sending (its Content-Length at once, a
        chunked body as it grows); whether it fits."""
        held = self.reserved[conn]
        if size > held:
            if self.buffered - held + size + self.queue.bytes > self.max_buffered:
                return False
            self.buffered += size - held
            self.reserved[conn] = size
        return True

    def _stop_reading(self, conn: TConn) -> None:
        del self.reading[conn]
        self.buffered -= self.reserved.pop(conn)
        self.poller.unregister(conn.sock)

    # ------------------------------------------------------------------ answers written by the loop

    def _send(self, conn: TConn, data: bytes) -> bool:
        """Write a short answer without blocking; whether all of it went out."""
        try:
            return conn.sock.send(data) == len(data)
        except OSError:
            return False

    def _answer_busy(self, conn: TConn, message: str, head_only: bool, retry_after: float = 1.0,
                     code: str = "overloaded", path: str = "", kept: WSGIRequest | None = None,
                     leftover: bytes = b"") -> None:  # fmt: skip
        """503 with Retry-After (whole seconds, at least 1). With `kept`, the whole request it answers, the
        connection stays open for the client's next request (`leftover`: what it pipelined behind), unless
        that request or the server's state says to close; else a close (lingering where the client sent
        more), and what the client pipelined behind is not read."""
        keep = (
            kept is not None and not kept.should_close() and self.alive and self.cfg.keepalive > 0
            and len(self.keepalived_conns) + len(self.paused) < self.max_keepalived
        )  # fmt: skip
        seconds = math.ceil(max(retry_after, 1.0))
        answer = error_answer(
            503, "Service Unavailable", message, "service_unavailable", code,
            head_only=head_only, headers=f"Retry-After: {seconds}" + CRLF,
            protocol=is_protocol_path(path), close=not keep,
        )  # fmt: skip
        sent = self._send(conn, answer)
        if sent and keep:
            conn.pipelined = leftover
            self.paused[conn] = time.monotonic() + min(seconds, MAX_PAUSE_SECONDS)
            if not leftover:  # watched only for the client going away; what it sends waits in the kernel
                self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_paused_readable, conn))
        elif not sent or self._nothing_unread(conn):
            self._close(conn)  # nothing unread: the close sends FIN, not a reset, so no lingering is needed
        else:
            self._close_lingering(conn)

    def _on_paused_readable(self, conn: TConn, _sock: socket.socket) -> None:
        """A paused connection's client sent its next request (left unread until the pause ends) or closed."""
        try:
            closed = not conn.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            closed = True
        self.poller.unregister(conn.sock)
        if closed:
            del self.paused[conn]
            self._close(conn)

    def _resume(self, conn: TConn) -> None:
        """A refused connection's pause is over: read its next request (pipelined already, or when it comes;
        a stopping worker keeps it only briefly, as for any kept-alive connection)."""
        del self.paused[conn]
        with contextlib.suppress(KeyError, ValueError):
            self.poller.unregister(conn.sock)  # still watched for a close
        if conn.pipelined:
            self.enqueue_req(conn)
            return
        try:
            self._keep_alive(conn)
        except (OSError, ValueError):  # the socket is gone
            self._close(conn)

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
        self._send(conn, error_answer(status, reason, message, "invalid_request_error", code))
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
        for conn, resume_at in list(self.paused.items()):
            if now >= resume_at or not self.alive:
                self._resume(conn)
        self._sweep(now)

    def _sweep(self, now: float) -> None:
        """What else the loop looks at once per SWEEP_SECONDS (the subclass's queue)."""

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
        page = CapturedAnswer()
        super().handle_error(req, page, addr, exc)
        status, _, reason = page.status_line().partition(" ")
        if not status.isdigit():
            return
        message = f"{reason}: {exc}" if str(exc) and int(status) < 500 else reason
        type_ = "invalid_request_error" if int(status) < 500 else "server_error"
        code = reason.lower().replace(" ", "_")
        try:
            client.setblocking(False)
            client.send(error_answer(int(status), reason, message, type_, code))
        except OSError:
            self.log.debug("Failed to send error message.")
