"""A request's work for the engine and the channel its results arrive on."""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Sequence
from typing import Any

from service.engine.types import Delta, GenerationRequest

FINISHED = object()  # put on a job's queue after its last item


class Job:
    """One request's work: a prompt to encode, then either its logits (`request` is None: next-token)
    or `request.n` sequences to decode. Results arrive on `results`, then FINISHED; an exception
    raised while serving it arrives in their place."""

    def __init__(self, prompt_ids: list[int], request: GenerationRequest | None = None) -> None:
        """`prompt_ids` start with the start symbol, or, continuing a session (`request.session`), with the
        session's last character."""
        self.prompt_ids = prompt_ids
        self.request = request
        self.results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.cancelled = False  # set by the consumer when it goes away; its rows leave at the next step
        self.open_choices = request.n if request is not None else 0
        self.taken_by: threading.Thread | None = None  # the scheduler thread that took it from the queue

    def cancel(self) -> None:
        self.cancelled = True

    def waiting(self) -> list[Any]:
        """Every result already on the queue, without blocking."""
        items = []
        while True:
            try:
                items.append(self.results.get_nowait())
            except queue.Empty:
                return items


def release_results(items: list[Any]) -> Generator[Any, None, bool]:
    """Yield `items` with each choice's deltas merged, up to an end marker (always the last item):
    re-raise a failure of the batch after the text that came before it; True at FINISHED."""
    end = items[-1] if items and (items[-1] is FINISHED or isinstance(items[-1], BaseException)) else None
    yield from merge_deltas(items[:-1] if end is not None else items)
    if isinstance(end, BaseException):
        raise end
    return end is FINISHED


def fail_jobs(exc: BaseException, jobs: Sequence[Job]) -> None:
    for job in {id(j): j for j in jobs}.values():
        failure = RuntimeError(f"the decode batch failed: {exc!r}")  # one per job: raised on its own thread
        failure.__cause__ = exc
        job.results.put(failure)


def merge_deltas(items: list[Any]) -> list[Any]:
    """Consecutive pieces of each choice joined into one Delta, choices in order of first appearance;
    anything that is not a Delta passes through unchanged."""
    merged: dict[int, Delta] = {}
    out: list[Any] = []
    for item in items:
        if not isinstance(item, Delta):
            out.append(item)
            continue
        head = merged.get(item.index)
        if head is None:
            head = merged[item.index] = Delta(item.index, item.text, list(item.tokens))
            out.append(head)
        else:
            head.text += item.text
            head.tokens.extend(item.tokens)
        head.finish_reason = item.finish_reason
        head.completion_tokens = item.completion_tokens
        head.cumulative_logprob = item.cumulative_logprob
        head.session = item.session
    return out
