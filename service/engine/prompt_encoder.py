"""Prompts encoded together, each from the longest cached prefix, a chunk per step for long ones."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from service.engine.jobs import Job
from service.engine.lstm_kernels import FusedStep
from service.engine.observer import IGNORED, EngineObserver
from service.engine.prefix_cache import CHECKPOINT, CachedState, PrefixCache, PrefixKeys
from service.engine.timings import PromptBatch


@dataclass(kw_only=True)
class Encoding:
    """A job whose prompt is being encoded: `done` ids so far, with the state and logits after them."""

    job: Job
    keys: PrefixKeys | None  # the prompt's cache keys; None when it is not cached
    done: int = 0
    h: torch.Tensor | None = None  # (layers, H); None: the zero state (nothing read yet)
    c: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (V,)

    @property
    def remaining(self) -> int:
        return len(self.job.prompt_ids) - self.done

    def encoded(self) -> CachedState:
        """The state and logits after the whole prompt, once it is read."""
        assert not self.remaining and self.h is not None and self.c is not None and self.logits is not None
        return CachedState(length=self.done, h=self.h, c=self.c, logits=self.logits)


class PromptEncoder:
    """The prompts of admitted jobs, encoded together: each from the longest cached prefix of its prompt
    (or from its session's state), caching the state at every checkpoint it reaches."""

    def __init__(
        self,
        kernel: FusedStep,
        observer: EngineObserver = IGNORED,
        cache: PrefixCache | None = None,
        prefill_chunk_chars: int = 0,
    ) -> None:
        """`prefill_chunk_chars` > 0: a call to `advance` reads at most that many ids of each prompt (chunked prefill);
        0 reads prompts whole."""
        self.kernel = kernel
        self.observer = observer  # hears of every prompt batch
        self.cache = cache
        self.prefill_chunk_chars = prefill_chunk_chars
        self.pending: list[Encoding] = []

    def __bool__(self) -> bool:
        return bool(self.pending)

    def rows_reserved(self) -> int:
        """The rows that the generation jobs among the pending ones will take."""
        return sum(e.job.request.n for e in self.pending if e.job.request is not None)

    def add(self, job: Job) -> None:
        encoding = Encoding(job=job, keys=None)
        start = job.request.session if job.request is not None else None
        if start is not None:
            encoding.h, encoding.c = start.h, start.c
        elif self.cache is not None:  # a session's state is its own: only prompts from the start are cached
            looked_up = time.time_ns() if job.trace is not None else 0
            encoding.keys = PrefixKeys(job.prompt_ids)
            hit = self.cache.lookup(encoding.keys)
            if hit is not None:
                encoding.done, encoding.h, encoding.c, encoding.logits = hit.length, hit.h, hit.c, hit.logits
            if job.trace is not None:
                job.trace.cache_lookup_ns = (looked_up, time.time_ns())
                job.trace.cache_hit_chars = encoding.done
        if job.trace is not None:
            job.trace.prompt_chars = len(job.prompt_ids) - 1  # after the start symbol (or a session's last)
        self.pending.append(encoding)

    def jobs(self) -> list[Job]:
        return [e.job for e in self.pending]

    def take_all(self) -> list[Job]:
        """The pending jobs, which are no longer pending."""
        jobs, self.pending = [e.job for e in self.pending], []
        return jobs

    def advance(self) -> list[Encoding]:
        """Advance every pending prompt, all together, by at most `prefill_chunk_chars` ids (to its end when 0),
        in pieces that end at cache checkpoints; returns the encodings that are done. Cancelled jobs are dropped."""
        self.pending = [e for e in self.pending if not e.job.cancelled]
        limits = [len(e.job.prompt_ids) for e in self.pending]
        chunk = self.prefill_chunk_chars
        if chunk:  # up to the next multiple of the chunk, so that a prompt's pieces are the same whatever joins
            limits = [min(n, (e.done // chunk + 1) * chunk) for e, n in zip(self.pending, limits, strict=True)]
        while active := [(e, limit) for e, limit in zip(self.pending, limits, strict=True) if e.done < limit]:
            ends = [limit for _, limit in active]
            if self.cache is not None:  # pieces end at checkpoints, where the state is cached
                ends = [
                    min(end, (e.done // CHECKPOINT + 1) * CHECKPOINT) for (e, _), end in zip(active, ends, strict=True)
                ]
            self._read([e for e, _ in active], ends)
        done = [e for e in self.pending if not e.remaining]
        self.pending = [e for e in self.pending if e.remaining]
        return done

    def _read(self, encodings: list[Encoding], ends: list[int]) -> None:
        """One prompt batch: each encoding reads its prompt on to `ends[i]`."""
        pieces = [e.job.prompt_ids[e.done : end] for e, end in zip(encodings, ends, strict=True)]
        initial = None
        started = [e.h for e in encodings if e.h is not None]
        if started:
            zeros = torch.zeros_like(started[0])
            initial = (
                torch.stack([zeros if e.h is None else e.h for e in encodings], dim=1),
                torch.stack([zeros if e.c is None else e.c for e in encodings], dim=1),
            )
        traced = [e.job.trace for e in encodings if e.job.trace is not None]
        began = time.time_ns() if traced else 0
        logits, (h, c) = self.kernel.prefill(pieces, initial)
        self.observer.prefilled(len(encodings))
        if traced:
            contexts = [trace.context for trace in traced]
            batch = PromptBatch(started_ns=began, ended_ns=time.time_ns(), prompts=len(encodings), contexts=contexts)
            for trace in traced:
                trace.batches.append(batch)
        for i, (e, end) in enumerate(zip(encodings, ends, strict=True)):
            e.done, e.h, e.c, e.logits = end, h[:, i].clone(), c[:, i].clone(), logits[i].clone()
            if self.cache is not None and e.keys is not None and (end % CHECKPOINT == 0 or not e.remaining):
                self.cache.put(e.keys, CachedState(length=end, h=e.h, c=e.c, logits=e.logits))
