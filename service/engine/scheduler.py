"""Continuous batching: a `Scheduler` runs one `DecodeBatch` on a background thread of each worker
process, so that concurrent requests share every step."""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Generator, Sequence

import torch

from service.engine.decode_batch import DecodeBatch
from service.engine.jobs import Job, Logits, Result, fail_jobs, release_results
from service.engine.types import Delta

log = logging.getLogger(__name__)


def split_admissible(waiting: Sequence[Job], room: int, empty: bool, now: float) -> tuple[list[Job], list[Job]]:
    """The waiting jobs that fit in `room` free rows, in arrival order, and those that still wait (one job
    always fits an `empty` batch). Next-token jobs take no rows and never wait; cancelled jobs are dropped."""
    taken: list[Job] = []
    still_waiting: list[Job] = []
    for job in waiting:
        if job.cancelled:
            continue
        req = job.request
        need = req.n if req is not None and not req.expired(now) else 0  # an expired job ends in admit, rowless
        if still_waiting and need:
            still_waiting.append(job)  # keep the order among jobs that take rows
        elif need <= room or (empty and not taken):
            taken.append(job)
            room -= need
        else:
            still_waiting.append(job)
    return taken, still_waiting


_SCHEDULERS: weakref.WeakSet[Scheduler] = weakref.WeakSet()


def _reset_schedulers_after_fork() -> None:
    for scheduler in list(_SCHEDULERS):
        scheduler._reset()


os.register_at_fork(after_in_child=_reset_schedulers_after_fork)


class Scheduler:
    """Continuous batching on a background thread of the current process (started on first use,
    so that a gunicorn worker forked from a preloading master gets its own)."""

    def __init__(
        self,
        make_batch: Callable[[], DecodeBatch],
        max_rows: int = 64,
        gather_seconds: float = 0.005,
        stream_interval_seconds: float = 0.005,
    ) -> None:
        self.make_batch = make_batch
        self.max_rows = max_rows  # sequences decoded together; later jobs wait for rows to free up
        # After a job's first piece, its reader waits this long before taking what has accumulated.
        # A piece per character cost a thread wake-up, a JSON event and a socket write each, on the
        # cores that also run the model; a few milliseconds merges several characters per piece.
        self.stream_interval_seconds = stream_interval_seconds
        # When the batch is idle and recent prompt batches held several requests (so clients are
        # concurrent), wait up to this long for as many prompts as the largest of them before
        # encoding: clients come back a few milliseconds apart, and one encode of k prompts costs
        # far less than k encodes. Matching only the last batch's size let a group of clients split
        # into smaller groups that stayed apart.
        self.gather_seconds = gather_seconds
        self._reset()
        # A gunicorn worker is forked from the master that built the engine: it must not inherit
        # the master's lock (possibly held), queue or thread. Held weakly, so an unloaded model
        # version's scheduler (and through it the engine) can be freed.
        _SCHEDULERS.add(self)

    def _reset(self) -> None:
        self._waiting: list[Job] = []
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps run, for tests and the benchmark
        self.max_batch_seen = 0
        self.prefills = 0  # prompt batches encoded, and the prompts in them
        self.prefilled_prompts = 0
        # (admitted at, prompts) of the last batches; only those of the last RECENT_SECONDS count.
        self._recent_prefill_sizes: collections.deque[tuple[float, int]] = collections.deque(maxlen=8)

    RECENT_SECONDS = 0.5  # prompt batches older than this no longer say that clients come together

    def expected_prompts(self, now: float) -> int:
        """How many prompts an idle scheduler waits for: as many as the largest recent batch held, so that
        concurrent clients keep being encoded together. Only batches of the last RECENT_SECONDS count: a
        lone request that comes after a burst has ended is encoded at once, not kept for company."""
        return max((n for at, n in self._recent_prefill_sizes if now - at <= self.RECENT_SECONDS), default=0)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Let the scheduler thread end once it has nothing to do (a model version being unloaded); a later
        submit starts a new one."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()

    def submit(self, job: Job) -> None:
        if job.trace is not None:
            job.trace.submitted_ns = time.time_ns()
        with self._wakeup:
            self._stopping = False
            if not self.alive():
                self._thread = threading.Thread(target=self._loop, name="decode-scheduler", daemon=True)
                self._thread.start()
            self._waiting.append(job)
            self._wakeup.notify()

    # A reader whose generation's deadline passed this long ago with no result gives up: the deadline ends
    # a generation at the next step, so a longer silence means its scheduler can no longer answer.
    READER_GRACE_SECONDS = 10.0

    def _next(self, job: Job) -> Result:
        """The job's next result; raises if the thread that holds it is gone, or (nothing would ever come)
        when there is no thread to take it, or once its deadline is long past."""
        while True:
            try:
                return job.results.get(timeout=1.0)
            except queue.Empty:
                holder = job.taken_by
                if holder is not None and not holder.is_alive():
                    raise RuntimeError("the decode scheduler that held this request stopped") from None
                if holder is None and not self.alive():
                    raise RuntimeError("the decode scheduler stopped") from None
                req = job.request
                if (
                    req is not None
                    and req.deadline is not None
                    and time.monotonic() > req.deadline + self.READER_GRACE_SECONDS
                ):
                    raise RuntimeError("the decode scheduler did not answer by the request's deadline") from None

    def results(self, job: Job) -> Generator[Delta | Logits, None, None]:
        """Submit `job` and yield its results; closing the iterator cancels it.

        Deltas that are waiting when the consumer comes back for more are merged per choice.
        After the first piece (so the time to the first character is unchanged), the consumer
        waits `stream_interval_seconds` once a new piece is there, and takes everything that came
        meanwhile: fewer, larger chunks, each at most that much later.
        """
        self.submit(job)
        first = True
        try:
            while True:
                item = self._next(job)
                if isinstance(item, Delta) and not first and self.stream_interval_seconds > 0:
                    time.sleep(self.stream_interval_seconds)
                first = False
                if (yield from release_results([item, *job.waiting()])):
                    return
        finally:
            job.cancel()

    def _admissible(self, batch: DecodeBatch) -> list[Job]:
        reserved = batch.reserved()
        room = self.max_rows - reserved
        taken, self._waiting = split_admissible(self._waiting, room, reserved == 0, time.monotonic())
        for job in taken:
            job.taken_by = threading.current_thread()
            if job.trace is not None:
                job.trace.taken_ns = time.time_ns()
        return taken

    # With more than one torch thread, a scheduler thread that has been idle this long ends (the next job
    # starts another): its OpenMP threads live as long as it does, and GNU OpenMP makes every team's
    # threads sleep at each step's wait while it manages more threads than there are CPUs, so the idle
    # scheduler of another model version would slow the busy one several times over.
    IDLE_SECONDS = 1.0

    def _loop(self) -> None:
        idle_wait = self.IDLE_SECONDS if torch.get_num_threads() > 1 else None
        own: list[DecodeBatch] = []  # this thread's batch, once made
        try:
            self._serve(idle_wait, own)
        except BaseException as exc:  # the thread itself is dying: nothing it held may wait for ever
            log.critical("the decode scheduler thread died; failing its requests and those waiting")
            with self._wakeup:
                waiting, self._waiting = self._waiting, []
                if self._thread is threading.current_thread():
                    self._thread = None
            fail_jobs(exc, [*(own[0].held_jobs() if own else []), *waiting])
            raise

    def _serve(self, idle_wait: float | None, own: list[DecodeBatch]) -> None:
        batch: DecodeBatch | None = None
        while True:
            jobs: list[Job] = []
            try:
                if batch is None:
                    batch = self.make_batch()
                    own.append(batch)
                with self._wakeup:
                    while not self._waiting and not batch.busy:
                        if self._stopping:
                            self._thread = None
                            return
                        if not self._wakeup.wait(idle_wait) and not self._waiting:
                            self._thread = None  # idle with several torch threads: see IDLE_SECONDS
                            return
                    expected = self.expected_prompts(time.monotonic())
                    if not batch.busy and expected > 1:
                        until = time.monotonic() + self.gather_seconds
                        while len(self._waiting) < expected and (left := until - time.monotonic()) > 0:
                            self._wakeup.wait(left)
                    jobs = self._admissible(batch)
                if jobs:
                    self.prefills += 1  # counted first: admit hands out results, and a reader may look at once
                    self.prefilled_prompts += len(jobs)
                    self._recent_prefill_sizes.append((time.monotonic(), len(jobs)))
                    batch.admit(jobs)
                if batch.busy:
                    self.max_batch_seen = max(self.max_batch_seen, batch.step())
                    self.steps += 1
            except Exception as exc:  # a bug must fail its requests, never the thread that serves the others
                log.exception("decode step failed; failing the requests in the batch")
                if batch is None:  # no batch to serve them with: fail everything that waits
                    with self._wakeup:
                        jobs, self._waiting = [*jobs, *self._waiting], []
                    fail_jobs(exc, jobs)
                else:
                    batch.fail(exc, jobs)
