"""Connections spread evenly over the workers. The workers share one listening socket, and whichever wakes
first accepts: a burst of new connections often all went to one worker, which then did all the work of
that client while the other core idled. Each worker publishes its open connections in a table in shared
memory, made by the master before it forks, and leaves new connections to a live peer that has fewer."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

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


def set_pid(slot: int | None, pid: int) -> None:
    """In the worker, once it runs: its row names it."""
    if _table is not None and slot is not None:
        _table[slot * FIELDS + PID] = pid


def mark_stopping(slot: int | None) -> None:
    """In a worker that stopped accepting: its peers stop leaving connections to it."""
    if _table is not None and slot is not None:
        _table[slot * FIELDS + HEARTBEAT] = 0.0


def leave_to_peer(slot: int | None, connections: int) -> bool:
    """Publish this worker's open connections; whether a live peer has fewer."""
    if _table is None or slot is None:
        return False
    now = time.monotonic()
    _table[slot * FIELDS + CONNECTIONS] = connections
    _table[slot * FIELDS + HEARTBEAT] = now
    for peer in range(len(_table) // FIELDS):
        row = peer * FIELDS
        if peer == slot or _table[row + PID] <= 0 or now - _table[row + HEARTBEAT] > STALE_SECONDS:
            continue
        if _table[row + CONNECTIONS] < connections - connections // BALANCE_TOLERANCE:
            return True
    return False
