"""When this process is stopping, and the moment by which the work it still runs must have ended. No
Flask in here: the engine reads it at every decode step, the app before each request.

gunicorn gives a worker GRACEFUL_TIMEOUT seconds after SIGTERM, then kills it: a generation still
running then would be cut mid-body, with no finish reason and no `[DONE]`. So SIGTERM sets a drain
deadline a margin before that, `begin_shutdown`; a generation still running at it ends there with
finish_reason "shutdown" (its last piece and `[DONE]` are written in the margin), and a request that
only starts after it gets 503.
"""

from __future__ import annotations

import threading
import time

_drain_deadline: float | None = None  # time.monotonic(); None while the process serves normally


def drain_margin(grace_seconds: float) -> float:
    """How long before the kill the work must end: time to write its last piece and close."""
    return min(max(1.0, 0.2 * grace_seconds), grace_seconds / 2)


def begin_shutdown(grace_seconds: float, now: float | None = None) -> float:
    """SIGTERM came: work still running must end within `grace_seconds` less the margin. Async-signal-safe
    (one assignment); a second SIGTERM does not move the deadline."""
    global _drain_deadline
    if _drain_deadline is None:
        start = time.monotonic() if now is None else now
        _drain_deadline = start + grace_seconds - drain_margin(grace_seconds)
    return _drain_deadline


def drain_deadline() -> float | None:
    return _drain_deadline


def draining(now: float) -> bool:
    """Whether work running at `now` must end: the process is stopping and its drain deadline has passed."""
    return _drain_deadline is not None and now >= _drain_deadline


_request = threading.local()  # the current request's arrival, set by the worker for its thread


def set_arrival(arrived: float | None) -> None:
    """When the request this thread serves was complete at the server (time.monotonic()), before it waited
    for a thread; None when not known (the app without the worker)."""
    _request.arrived = arrived


def arrival() -> float | None:
    return getattr(_request, "arrived", None)


def request_deadline(seconds: float, timeout: float | None = None, now: float | None = None) -> float:
    """A request's deadline: `seconds` from now, its own `timeout` from its arrival, or the drain deadline,
    whichever comes first."""
    start = time.monotonic() if now is None else now
    own = start + seconds
    if timeout is not None:
        own = min(own, (arrival() or start) + timeout)
    return own if _drain_deadline is None else min(own, _drain_deadline)


def reset() -> None:
    """Serve normally again (tests)."""
    global _drain_deadline
    _drain_deadline = None
