"""Shadow traffic: a sample of a model's requests run again on a candidate version, off the request's path,
to compare the two on live text before the candidate takes any traffic. No Flask in here.

A model's traffic.json names the candidate and the share of requests mirrored to it,

    {"weights": {"3": 100}, "shadow": {"version": 4, "percent": 10}}

The request is answered first and alone; then its text joins a short queue that one thread per worker
works through. A full queue drops what arrives (`charlm_shadow_dropped_total`), so under load shadow work
is the first to go, and a comparison never delays, changes or fails a response. For next-token and
scoring requests the text is the request's; for a generation, the prompt and the text the serving
version wrote. Both versions score the text, the same code as /v1/score, and the totals go to
Prometheus per (serving, candidate) pair: characters compared, bits each version spent on them, and, for
next-token requests, how often the two agree on the most likely next character.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from service.metrics import (
    SHADOW_BITS,
    SHADOW_CHARS,
    SHADOW_COMPARISONS,
    SHADOW_DROPPED,
    SHADOW_TOP1_AGREEMENTS,
)
from service.models.versions import ModelVersion

log = logging.getLogger("service.models.shadow")

Kind = Literal["next_token", "score", "generation"]
QUEUE_SIZE = 32  # comparisons waiting per worker; more are dropped
MAX_TEXT_CHARS = 4096  # a comparison looks at a text's last characters at most (a long score request)


@dataclass(frozen=True)
class ShadowConfig:
    version: int
    percent: float


@dataclass(frozen=True)
class Comparison:
    serving: ModelVersion
    candidate: ModelVersion
    kind: Kind
    text: str
    serving_bits: float | None = None  # what the request already knows: the serving version's bits on text
    serving_top1: str | None = None  # ... and its most likely next character after it (next-token)


class ShadowRunner:
    def __init__(
        self, acquire_version: Callable[[ModelVersion], bool], release: Callable[[ModelVersion], None]
    ) -> None:
        """`acquire_version(mv)` and `release(mv)` hold a version loaded for the comparison (the repository's)."""
        self._acquire = acquire_version
        self._release = release
        self._queue: queue.Queue[Comparison] = queue.Queue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._pid = os.getpid()

    def offer(self, serving: ModelVersion, candidate: ModelVersion | None, percent: float, kind: Kind, text: str,
              serving_bits: float | None = None, serving_top1: str | None = None) -> None:  # fmt: skip
        """Mirror this request to `candidate` with probability `percent` / 100, if the queue has room; what the
        request computed anyway (the serving version's bits on the text, its top next character) is not
        computed again."""
        if candidate is None or candidate is serving or not text or random.random() * 100 >= percent:
            return
        if len(text) > MAX_TEXT_CHARS:
            text, serving_bits = text[-MAX_TEXT_CHARS:], None
        if not self._acquire(candidate):
            return  # retired since the request resolved it
        try:
            self._queue.put_nowait(Comparison(serving, candidate, kind, text, serving_bits, serving_top1))
        except queue.Full:
            self._release(candidate)
            SHADOW_DROPPED.labels(model=serving.name).inc()
            return
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None or self._pid != os.getpid():  # a forked worker starts its own
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._work, name="shadow", daemon=True)
                self._thread.start()

    def idle(self, timeout: float) -> bool:
        """Wait until every comparison offered so far is done (for tests and benchmarks)."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def _work(self) -> None:
        # The lowest CPU priority, for this thread only (Linux schedules threads apart): comparisons run on
        # time the requests leave idle, and under load the queue fills and drops instead.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            item = self._queue.get()
            try:
                compare(item)
            except Exception:  # a comparison that fails is logged and forgotten: it answers no one
                log.exception("shadow comparison of %s with %s failed", item.serving.id, item.candidate.id)
            finally:
                self._release(item.candidate)
                self._queue.task_done()


def read(mv: ModelVersion, text: str) -> tuple[float, str]:
    """A version's bits on `text` and its most likely next character after it, in one pass (characters, not
    ids, are compared: two versions' vocabularies may differ)."""
    state, score = mv.engine.continue_sequence(None, text)
    return score.bits_per_char * score.n_chars, mv.engine.vocab.chars[int(torch.argmax(state.logits))]


def compare(item: Comparison) -> None:
    """Read the text with both versions (the serving one only for what the request did not compute)."""
    labels = {"serving": item.serving.id, "candidate": item.candidate.id, "kind": item.kind}
    theirs, their_top1 = read(item.candidate, item.text)
    ours, our_top1 = item.serving_bits, item.serving_top1
    if ours is None or (item.kind == "next_token" and our_top1 is None):
        ours, our_top1 = read(item.serving, item.text)
    SHADOW_COMPARISONS.labels(**labels).inc()
    SHADOW_CHARS.labels(**labels).inc(len(item.text))
    SHADOW_BITS.labels(**labels, version="serving").inc(ours)
    SHADOW_BITS.labels(**labels, version="candidate").inc(theirs)
    if item.kind == "next_token" and our_top1 == their_top1:
        SHADOW_TOP1_AGREEMENTS.labels(serving=item.serving.id, candidate=item.candidate.id).inc()
