"""What a traced request's engine work leaves behind for its trace: when it waited, hit the prefix cache,
had its prompt encoded (and with whom) and decoded, as wall-clock nanoseconds (`time.time_ns`, the clock
OpenTelemetry's timestamps use). The engine only records; service.api.tracing turns the records into spans
once the request has ended. Untraced requests carry none, and cost one `is None` check at each place.

The request's thread opens the records (`begin`); every job the engine builds on that thread while they
are open takes a `JobTrace` (`for_job`), as usage.py counts generated characters per thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True, eq=False)
class PromptBatch:
    """One call of the prompt encoder over several prompts: one computation that served them all, which
    each traced request's encode span links to the others for."""

    started_ns: int
    ended_ns: int
    prompts: int  # prompts read together
    contexts: list[Any]  # the request spans of the traced jobs among them (not their records: no chains)


@dataclass(kw_only=True, eq=False)
class JobTrace:
    """One job's engine timings."""

    context: Any  # the request's span (an OpenTelemetry span; opaque here)
    submitted_ns: int = 0  # handed to the scheduler
    taken_ns: int = 0  # the scheduler took it into its batch
    cache_lookup_ns: tuple[int, int] | None = None  # the prefix-cache lookup, when the prompt was looked up
    cache_hit_chars: int = 0  # of the prompt, read from the cache
    prompt_chars: int = 0  # characters of the prompt
    batches: list[PromptBatch] = field(default_factory=list)  # the encoder calls that read its prompt
    decode_started_ns: int = 0  # its rows joined the decode batch (generations only)
    finished_ns: int = 0  # its last result was handed over
    generated_chars: int = 0
    finish_reasons: list[str] = field(default_factory=list)  # one per choice, as the choices end


class _Open(threading.local):
    context: object = None  # the request span's context while a traced request runs on this thread
    traces: list[JobTrace] | None = None


_open = _Open()


def begin(context: object) -> list[JobTrace]:
    """Record the engine work of the request now running on this thread; returns the list its jobs'
    traces will be added to."""
    _open.context, _open.traces = context, []
    return _open.traces


def end() -> None:
    """No more recording on this thread (the request is over)."""
    _open.context, _open.traces = None, None


def for_job() -> JobTrace | None:
    """A new job's trace when its request is traced, else None."""
    if _open.traces is None:
        return None
    trace = JobTrace(context=_open.context)
    _open.traces.append(trace)
    return trace
