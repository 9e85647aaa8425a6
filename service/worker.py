"""The gunicorn worker class: gunicorn's threaded worker, refusing new work promptly on SIGTERM and
spreading connections evenly over the workers."""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

# One row per worker slot: pid (0 for a free slot, -1 while its worker starts), open connections,
# and the time.monotonic() (one clock for every process) of its event loop's last turn.
PID, CONNECTIONS, HEARTBEAT = range(3)
FIELDS = 3
STALE_SECONDS = 2.0  # a peer whose loop has not turned for this long (stuck or dying) is left out
DEFER_POLL_SECONDS = 0.01  # how often a worker that leaves connections to its peers looks again

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


class GracefulThreadWorker(ThreadWorker):
    """gthread, with two changes.

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

    def init_process(self) -> None:
        if _table is not None and self.connection_slot is not None:
            _table[self.connection_slot * FIELDS + PID] = os.getpid()
        super().init_process()

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()

    # gthread's loop accepts while `nr_conns < worker_connections`, re-evaluated at every turn.
    @property  # type: ignore[override]
    def worker_connections(self) -> int:
        if self._leave_to_peer():
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
            if _table[row + CONNECTIONS] < self.nr_conns:
                return True
        return False

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        # A worker that is not accepting only wakes for its own connections' events, which may be
        # seconds apart: while it leaves new connections to a peer it looks again every few ms.
        if not self._accepting and self.alive:
            timeout = min(timeout, DEFER_POLL_SECONDS)
        super().wait_for_and_dispatch_events(timeout)
