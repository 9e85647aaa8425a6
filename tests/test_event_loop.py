"""The worker's event loop: an event that an earlier callback of the same turn made stale is skipped, and a
callback that raises costs its connection, never the worker."""

from __future__ import annotations

import collections
import json
import selectors
import socket
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from gunicorn.workers.gthread import TConn

from benchmarks.servers import metric_total
from service.server.loop_reading import LoopReadingWorker
from tests.conftest import children, gunicorn_process
from tests.test_admission import ENV


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def exception(self, message: str, *args: Any) -> None:
        self.lines.append(message % args)

    warning = exception


def bare_loop() -> Any:
    """A LoopReadingWorker with only what its turn of the loop uses (no gunicorn arbiter, no app)."""
    worker: Any = object.__new__(LoopReadingWorker)
    worker.poller = selectors.DefaultSelector()
    worker.log = Log()
    worker.metrics = SimpleNamespace(LOOP_FAILURES=SimpleNamespace(inc=lambda: None))
    worker.loop_failures = 0
    worker.reading, worker.reserved, worker.lingering, worker.paused = {}, {}, {}, {}
    worker.keepalived_conns = collections.deque()
    worker.buffered = 0
    worker.nr_conns = 0
    return worker


def connection(worker: Any) -> tuple[TConn, socket.socket]:
    ours, theirs = socket.socketpair()
    theirs.sendall(b"x")  # readable at the next select
    worker.nr_conns += 1
    return TConn(SimpleNamespace(), ours, ("127.0.0.1", 1), ("127.0.0.1", 2)), theirs


@pytest.mark.unit
def test_an_event_made_stale_by_an_earlier_callback_of_the_same_turn_is_skipped() -> None:
    worker = bare_loop()
    (first, a), (second, b) = connection(worker), connection(worker)
    ran: list[str] = []

    def unregister_the_other(conn: TConn, other: TConn, _sock: socket.socket) -> None:
        ran.append(conn.client[0])
        worker.poller.unregister(other.sock)  # what a freed thread does to a queued request it takes

    worker.poller.register(first.sock, selectors.EVENT_READ, partial(unregister_the_other, first, second))
    worker.poller.register(second.sock, selectors.EVENT_READ, partial(unregister_the_other, second, first))
    worker.wait_for_and_dispatch_events(timeout=1.0)
    assert len(ran) == 1 and worker.loop_failures == 0  # the second event was stale, whichever came first
    for sock in (first.sock, second.sock, a, b):
        sock.close()


@pytest.mark.unit
def test_a_callback_that_raises_closes_its_connection_and_the_loop_goes_on() -> None:
    worker = bare_loop()
    (bad, a), (good, b) = connection(worker), connection(worker)
    served: list[TConn] = []

    def broken(conn: TConn, _sock: socket.socket) -> None:
        raise KeyError("a state the loop did not expect")

    worker.reading[bad] = object()
    worker.poller.register(bad.sock, selectors.EVENT_READ, partial(broken, bad))
    worker.poller.register(good.sock, selectors.EVENT_READ, lambda _sock: served.append(good))
    worker.wait_for_and_dispatch_events(timeout=1.0)
    assert served == [good] and worker.loop_failures == 1 and len(worker.log.lines) == 1
    assert bad not in worker.reading and bad.sock.fileno() == -1 and worker.nr_conns == 1
    assert good.sock.fileno() != -1 and worker.poller.get_key(good.sock)
    for sock in (good.sock, a, b):
        sock.close()


def test_clients_leaving_the_queue_while_it_drains_do_not_end_the_worker(tiny_artifacts: Path) -> None:
    """Queued requests whose clients go away while the one request thread takes queued requests one after
    another: the events of both kinds come in the same loop turns, and the worker stays up and answers."""
    body = json.dumps({"text": "To be"}).encode()
    request = b"POST /v1/next-token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    request += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    with gunicorn_process(tiny_artifacts, QUEUE_WAIT_SECONDS="60", **ENV) as (master, base):
        workers = children(master.pid)
        port = int(base.rsplit(":", 1)[1])
        for _ in range(ROUNDS):
            clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(CLIENTS)]
            for client in clients:
                client.sendall(request)
            for client in clients:  # most are still queued: they leave while the thread frees up again and again
                client.close()
        waiting(base, 0)  # the loop has seen every client leave
        answer = requests.post(f"{base}/v1/next-token", json={"text": "To be"}, timeout=30)
        assert answer.status_code == 200, answer.text
        text = requests.get(f"{base}/metrics", timeout=5).text
        assert metric_total(text, "charlm_loop_failures_total") == 0
        assert children(master.pid) == workers  # the same worker throughout


ROUNDS, CLIENTS = 10, 60


def waiting(base: str, count: int) -> None:
    """Until at most `count` model requests wait in the worker's queue (bounded)."""
    for _ in range(200):
        text = requests.get(f"{base}/metrics", timeout=5).text
        if metric_total(text, "charlm_requests_waiting") <= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"more than {count} requests still wait")
