"""Admission of model requests in the worker's event loop: a complete request that finds every request
thread busy waits in a queue that costs no thread, if the wait it can expect (the requests ahead of it over
the rate the worker has been answering at) is within its budget; its priority and timeout come from its
JSON body."""

from __future__ import annotations

import collections
import heapq
import json
import math
from dataclasses import dataclass

from gunicorn.workers.gthread import TConn

from service.server.request_framing import WSGIRequest

COLD_QUEUE = 64  # requests that may wait before a rate is measured (at least; 4 per thread where more)
MAX_RETRY_AFTER = 30.0  # seconds: the most a 503's Retry-After says
MAX_QUEUED = 4096  # model requests one worker holds waiting at most, whatever the wait estimate says
THROUGHPUT_WINDOW_SECONDS = 2.0  # the answering rate is measured over the completions this recent
PRIORITIES = {"interactive": 0, "batch": 1}  # the order the queue serves them in
OPTIONS_PEEK_BYTES = 64 << 10  # bodies up to this size are looked at for `priority` and `timeout`


@dataclass(kw_only=True, eq=False)
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
    parameters = fields.get("parameters")
    if request.path.startswith("/v2/") and isinstance(parameters, dict):
        return _protocol_options(parameters)
    priority = fields.get("priority")
    rank = PRIORITIES.get(priority, PRIORITIES["interactive"]) if isinstance(priority, str) else 0
    timeout = fields.get("timeout")
    if isinstance(timeout, int | float) and not isinstance(timeout, bool) and 0 < timeout <= 3600:
        return rank, float(timeout)
    return rank, None


def _protocol_options(parameters: dict[str, object]) -> tuple[int, float | None]:
    """Triton's `priority` (1 the highest, 0 the default; 2 and above count as batch) and `timeout`, in
    microseconds, from an Open Inference Protocol request's parameters."""
    priority = parameters.get("priority")
    batch = isinstance(priority, int) and not isinstance(priority, bool) and priority > 1
    rank = PRIORITIES["batch" if batch else "interactive"]
    timeout = parameters.get("timeout")
    if isinstance(timeout, int) and not isinstance(timeout, bool) and 0 < timeout <= 3600 * 10**6:
        return rank, timeout / 1e6
    return rank, None


class AdmissionQueue:
    """The model requests waiting for a request thread: a heap by priority rank, then arrival; the bytes of
    their bodies (counted in the worker's buffer budget); and the answering rate their waits are judged by."""

    def __init__(self, threads: int, queue_wait: float) -> None:
        self.heap: list[tuple[int, int, Queued]] = []  # with the entries of clients that left, until popped
        self.waiting = 0  # the entries whose clients are still there: what the queue's length is
        self.arrivals = 0  # the tie-breaker within a rank: first come, first served
        self.bytes = 0
        self.throughput = Throughput(cold_queue=max(4 * threads, COLD_QUEUE))
        self.queue_wait = queue_wait  # QUEUE_WAIT_SECONDS

    def drain_seconds(self, held: int, now: float) -> float:
        """How long `held` requests (running and waiting) take to answer at the measured rate: 0 with none,
        and while no rate is measured yet (an idle worker answering its first few)."""
        rate = self.throughput.rate(now)
        return 0.0 if held == 0 or rate is None else held / rate

    def __len__(self) -> int:
        return self.waiting

    def refusal(self, priority: int, timeout: float | None, now: float) -> tuple[str, float] | None:
        """Why a request of this rank and timeout may not wait, with the Retry-After to give; None if it may."""
        ahead = sum(1 for rank, _, entry in self.heap if rank <= priority and not entry.gone)
        budget = self.queue_wait if timeout is None else min(self.queue_wait, timeout)
        wait = self.throughput.expected_wait(ahead + 1, now)
        if budget > 0 and wait <= budget and self.waiting < MAX_QUEUED:
            return None
        retry = min(wait, MAX_RETRY_AFTER)
        message = (
            f"the server is busy: {self.waiting} requests are waiting, more than the {budget:g} s this one "
            f"may wait; retry in {math.ceil(max(retry, 1.0))} s"
        )
        return message, retry

    def push(self, entry: Queued, priority: int) -> None:
        self.arrivals += 1
        heapq.heappush(self.heap, (priority, self.arrivals, entry))
        self.bytes += entry.size
        self.waiting += 1

    def pop(self) -> Queued | None:
        """The first request still waiting (clients that left are dropped on the way), or None."""
        while self.heap:
            _, _, entry = heapq.heappop(self.heap)
            if not entry.gone:
                self.bytes -= entry.size
                self.waiting -= 1
                return entry
        return None

    def leave(self, entry: Queued) -> None:
        """Its client went away: it no longer counts as waiting, and it stays in the heap, skipped when its turn
        comes, unless the heap holds mostly such entries (then they are dropped now)."""
        entry.gone = True
        self.bytes -= entry.size
        self.waiting -= 1
        if len(self.heap) > 2 * self.waiting + 64:
            self.heap = [item for item in self.heap if not item[2].gone]
            heapq.heapify(self.heap)

    def take_due(self, now: float, draining: bool) -> list[Queued]:
        """Remove and return the requests past their timeout, or every one while the server drains."""
        kept, due = [], []
        for item in self.heap:
            entry = item[2]
            if entry.gone:
                continue
            if draining or (entry.deadline is not None and now >= entry.deadline):
                self.bytes -= entry.size
                self.waiting -= 1
                due.append(entry)
            else:
                kept.append(item)
        if len(kept) != len(self.heap):
            heapq.heapify(kept)
            self.heap = kept
        return due
