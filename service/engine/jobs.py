"""A request's work for the engine and the channel its results arrive on."""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from service.engine import timings
from service.engine.types import Delta, GenerationRequest


@dataclass(frozen=True)
class Logits:
    """A next-token job's answer: the logits (V,) after its prompt."""

    values: torch.Tensor


class Finished:
    """Put on a job's queue after its last result."""

    __slots__ = ()


FINISHED = Finished()


@dataclass(frozen=True)
class Failed:
    """The batch that served the job failed: raised on the job's own thread, after what came before."""

    error: BaseException


Result = Delta | Logits | Finished | Failed  # what a job's queue carries
Released = TypeVar("Released", Delta, Delta | Logits)


class Job:
    """One request's work: a prompt to encode, then either its logits (`Job.next_token`) or `request.n`
    sequences to decode (`Job.generation`). Results arrive on `results`, then FINISHED; a failure of the
    batch serving it arrives in their place, as Failed."""

    def __init__(self, prompt_ids: list[int], request: GenerationRequest | None = None) -> None:
        """`prompt_ids` start with the start symbol, or, continuing a session (`request.session`), with the
        session's last character."""
        self.prompt_ids = prompt_ids
        self.request = request
        self.results: queue.SimpleQueue[Result] = queue.SimpleQueue()
        self.cancelled = False  # set by the consumer when it goes away; its rows leave at the next step
        self.open_choices = request.n if request is not None else 0
        self.taken_by: threading.Thread | None = None  # the scheduler thread that took it from the queue
        self.trace = timings.for_job()  # its timings when its request is traced (service.engine.timings)

    @classmethod
    def next_token(cls, prompt_ids: list[int]) -> Job:
        """The logits after a prompt."""
        return cls(prompt_ids)

    @classmethod
    def generation(cls, prompt_ids: list[int], request: GenerationRequest) -> Job:
        """`request.n` continuations of a prompt."""
        return cls(prompt_ids, request)

    def cancel(self) -> None:
        self.cancelled = True

    def waiting(self) -> list[Result]:
        """Every result already on the queue, without blocking."""
        items: list[Result] = []
        while True:
            try:
                items.append(self.results.get_nowait())
            except queue.Empty:
                return items


def release_results(items: list[Result]) -> Generator[Delta | Logits, None, bool]:
    """Yield `items` with each choice's deltas merged, up to an end marker (always the last item):
    re-raise a failure of the batch after the text that came before it; True at FINISHED."""
    released: list[Delta | Logits] = [item for item in items if isinstance(item, Delta | Logits)]
    end = items[-1] if items and isinstance(items[-1], Finished | Failed) else None
    yield from merge_deltas(released)
    if isinstance(end, Failed):
        raise end.error
    return isinstance(end, Finished)


def fail_jobs(exc: BaseException, jobs: Sequence[Job]) -> None:
    for job in {id(j): j for j in jobs}.values():
        failure = RuntimeError(f"the decode batch failed: {exc!r}")  # one per job: raised on its own thread
        failure.__cause__ = exc
        job.results.put(Failed(failure))


def merge_deltas(items: Sequence[Released]) -> list[Released]:
    """Consecutive pieces of each choice joined into one Delta, choices in order of first appearance;
    logits pass through unchanged."""
    merged: dict[int, Delta] = {}
    out: list[Released] = []
    for item in items:
        if not isinstance(item, Delta):
            out.append(item)
            continue
        head = merged.get(item.index)
        if head is None:
            head = merged[item.index] = Delta(index=item.index, text=item.text, tokens=list(item.tokens))
            out.append(head)
        else:
            head.text += item.text
            head.tokens.extend(item.tokens)
        head.finish_reason = item.finish_reason
        head.completion_tokens = item.completion_tokens
        head.cumulative_logprob = item.cumulative_logprob
        head.session = item.session
    return out
