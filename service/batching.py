"""Continuous batching of LSTM state across requests. No Flask in here.

A `DecodeBatch` holds the active sequences (one per generation choice) as rows of one (h, c)
state and one logits tensor. Each step samples every row with its own seeded generator, hands
the characters to their requests, drops the rows that finished or were cancelled, and runs one
fused LSTM step for the rest. New prompts are encoded together (`FusedStep.prefill`), from the
longest prefix found in the worker's `PrefixCache`, and join at the next step boundary; a long
prompt is encoded a chunk per step, between decode steps (chunked prefill).

A `Scheduler` runs one `DecodeBatch` on a background thread of each worker process, so that
concurrent requests share every step. With batching off, a request runs its own `DecodeBatch`
on its own thread: the same code and the same arithmetic, one request at a time per batch.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from service import lifecycle
from service.kernels import FusedStep
from service.prefix_cache import CHECKPOINT, CachedState, PrefixCache, PrefixKeys
from service.sampling import SamplingParams, choose, make_generators

log = logging.getLogger("service.batching")


@dataclass
class TokenScore:
    token: str
    logprob: float
    top_logprobs: dict[str, float] | None = None  # the most likely characters at this position


@dataclass(frozen=True)
class SessionState:
    """Where a generated choice stopped: the state after everything the model read and generated but its
    last character, and that character (not yet fed). Continuing from it equals generating from the full
    text: the prompt, then every generated character, a matched stop string included."""

    h: torch.Tensor  # (layers, H)
    c: torch.Tensor  # (layers, H)
    next_id: int


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: Sequence[str] = ()
    n: int = 1
    top_logprobs: int = 0  # alternatives to report per generated character
    deadline: float | None = None  # time.monotonic() after which every choice ends with finish_reason "deadline"
    session: SessionState | None = None  # continue from here; `prompt` is then the text that follows
    keep_session: bool = False  # each choice's last piece carries its SessionState

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"a generation needs n >= 1 and max_tokens >= 1, not {self.n} and {self.max_tokens}")


@dataclass
class Delta:
    """A piece of one choice's text as it is released; the last piece of a choice has `finish_reason`.

    `tokens` holds one entry per released character, with its log-probability under the
    model (before temperature, top-k/top-p or penalties) and, when asked, the top alternatives.
    """

    index: int
    text: str
    tokens: list[TokenScore]
    finish_reason: str | None = None
    completion_tokens: int = 0  # on the last piece: characters generated, a matched stop string included
    cumulative_logprob: float = 0.0  # on the last piece: sum of the generated characters' log-probabilities
    session: SessionState | None = None  # on the last piece, when the request keeps sessions


@dataclass
class StopMatcher:
    """Finds stop strings in a growing text, holding back any tail that could still begin one,
    so that a stop string split across steps is caught and never reaches the client."""

    stops: Sequence[str]
    pending: list[TokenScore] = field(default_factory=list)

    def push(self, token: TokenScore) -> tuple[list[TokenScore], bool]:
        """Tokens safe to release now, and whether a stop string was found (its text is dropped)."""
        self.pending.append(token)
        text = "".join(t.token for t in self.pending)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], []
            return out, True
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> list[TokenScore]:
        out, self.pending = self.pending, []
        return out


def top_alternatives(logprobs: torch.Tensor, wanted: Sequence[int], chars: Sequence[str]) -> list[dict[str, float]]:
    """For row i of (N, V) log-probabilities, its `wanted[i]` most likely characters (empty for 0)."""
    k = min(max(wanted, default=0), len(chars))
    if k <= 0:
        return [{} for _ in wanted]
    top = torch.topk(logprobs, k, dim=-1)
    return [
        {chars[i]: lp for i, lp in list(zip(indices, values, strict=True))[:want]}
        for want, values, indices in zip(wanted, top.values.tolist(), top.indices.tolist(), strict=True)
    ]


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


def _release(items: list[Any]) -> Generator[Any, None, bool]:
    """Yield `items` with each choice's deltas merged, up to an end marker (always the last item):
    re-raise a failure of the batch after the text that came before it; True at FINISHED."""
    end = items[-1] if items and (items[-1] is FINISHED or isinstance(items[-1], BaseException)) else None
    yield from merge_deltas(items[:-1] if end is not None else items)
    if isinstance(end, BaseException):
        raise end
    return end is FINISHED


@dataclass
class _Encoding:
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
        return CachedState(self.done, self.h, self.c, self.logits)


class PromptEncoder:
    """The prompts of admitted jobs, encoded together: each from the longest cached prefix of its prompt
    (or from its session's state), caching the state at every checkpoint it reaches."""

    def __init__(
        self,
        kernel: FusedStep,
        on_prefill: Callable[[int], None] | None = None,
        cache: PrefixCache | None = None,
        chunk: int = 0,
    ) -> None:
        """`chunk` > 0: a call to `advance` reads at most that many ids of each prompt (chunked prefill);
        0 reads prompts whole."""
        self.kernel = kernel
        self.on_prefill = on_prefill  # called with the prompts of every prompt batch
        self.cache = cache
        self.chunk = chunk
        self.pending: list[_Encoding] = []

    def __bool__(self) -> bool:
        return bool(self.pending)

    def rows_reserved(self) -> int:
        """The rows that the generation jobs among the pending ones will take."""
        return sum(e.job.request.n for e in self.pending if e.job.request is not None)

    def add(self, job: Job) -> None:
        encoding = _Encoding(job, None)
        start = job.request.session if job.request is not None else None
        if start is not None:
            encoding.h, encoding.c = start.h, start.c
        elif self.cache is not None:  # a session's state is its own: only prompts from the start are cached
            encoding.keys = PrefixKeys(job.prompt_ids)
            hit = self.cache.lookup(encoding.keys)
            if hit is not None:
                encoding.done, encoding.h, encoding.c, encoding.logits = hit.length, hit.h, hit.c, hit.logits
        self.pending.append(encoding)

    def jobs(self) -> list[Job]:
        return [e.job for e in self.pending]

    def take_all(self) -> list[Job]:
        """The pending jobs, which are no longer pending."""
        jobs, self.pending = [e.job for e in self.pending], []
        return jobs

    def advance(self) -> list[_Encoding]:
        """Advance every pending prompt, all together, by at most `chunk` ids (to its end when 0), in pieces
        that end at cache checkpoints; returns the encodings that are done. Cancelled jobs are dropped."""
        self.pending = [e for e in self.pending if not e.job.cancelled]
        limits = [len(e.job.prompt_ids) for e in self.pending]
        if self.chunk:  # up to the next multiple of `chunk`, so that a prompt's pieces are the same whatever joins
            limits = [
                min(n, (e.done // self.chunk + 1) * self.chunk) for e, n in zip(self.pending, limits, strict=True)
            ]
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

    def _read(self, encodings: list[_Encoding], ends: list[int]) -> None:
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
        logits, (h, c) = self.kernel.prefill(pieces, initial)
        if self.on_prefill is not None:
            self.on_prefill(len(encodings))
        for i, (e, end) in enumerate(zip(encodings, ends, strict=True)):
            e.done, e.h, e.c, e.logits = end, h[:, i].clone(), c[:, i].clone(), logits[i].clone()
            if self.cache is not None and e.keys is not None and (end % CHECKPOINT == 0 or not e.remaining):
                self.cache.put(e.keys, CachedState(end, e.h, e.c, e.logits))


@dataclass
class _Row:
    """One generation choice inside the batch."""

    job: Job
    request: GenerationRequest  # the job's
    index: int
    generator: torch.Generator
    matcher: StopMatcher
    counts: torch.Tensor | None  # characters generated so far, when a penalty needs them
    generated: list[int] = field(default_factory=list)  # ids, for the cache entry where it stops
    produced: int = 0
    cumulative: float = 0.0
    finished: bool = False

    def record(self, token_id: int, logprob: float) -> None:
        self.produced += 1
        self.generated.append(token_id)
        self.cumulative += logprob
        if self.counts is not None:
            self.counts[token_id] += 1

    def take(self, token_id: int, token: TokenScore, now: float) -> tuple[str, list[TokenScore]] | None:
        """Record the row's new character and hand its job the text that no stop string can still claim;
        when the choice ends here, the reason and the text of its last piece instead."""
        self.record(token_id, token.logprob)
        released, stopped = self.matcher.push(token)
        reason = self.finish_reason(stopped, now)
        if reason is None:
            if released:
                self.job.results.put(Delta(self.index, "".join(t.token for t in released), released))
            return None
        self.finished = True
        return reason, released if stopped else released + self.matcher.flush()

    def finish(self, reason: str, released: list[TokenScore], session: SessionState | None) -> None:
        """Hand the job the choice's last piece, and FINISHED after the job's last choice."""
        text = "".join(t.token for t in released)
        self.job.results.put(Delta(self.index, text, released, reason, self.produced, self.cumulative, session))
        self.job.open_choices -= 1
        if self.job.open_choices == 0:
            self.job.results.put(FINISHED)

    def finish_reason(self, stopped: bool, now: float) -> str | None:
        """Why the choice ends after this character, or None while it goes on."""
        if stopped:
            return "stop"
        if self.produced >= self.request.max_tokens:
            return "length"
        if lifecycle.draining(now):  # first: a request started after SIGTERM has the drain deadline as its own
            return "shutdown"
        if self.request.expired(now):
            return "deadline"
        return None


class DecodeBatch:
    """The active sequences of one worker as rows of one state; see the module docstring."""

    def __init__(
        self,
        kernel: FusedStep,
        chars: Sequence[str],
        on_generated: Callable[[int], None] | None = None,
        on_prefill: Callable[[int], None] | None = None,
        cache: PrefixCache | None = None,
        prefill_chunk: int = 0,
    ) -> None:
        """`cache` holds the states after prompt prefixes (None: no cache). With `prefill_chunk` > 0, a
        step encodes at most that many ids of each prompt before it decodes (chunked prefill), so a
        long prompt does not pause the batch's streams for its whole encoding; 0 encodes prompts whole."""
        self.kernel = kernel  # the model's decode step and prompt encoder
        self.chars = chars
        self.on_generated = on_generated  # called with the rows of every decode step
        self.cache = cache
        self.prompts = PromptEncoder(kernel, on_prefill, cache, prefill_chunk)  # admitted, not yet encoded
        self.rows: list[_Row] = []
        self.h = self.c = self.logits = torch.empty(0)
        # Generation never emits U+FFFD (index 0): it stands for "some unknown character", not for itself.
        self.sampling_mask = torch.zeros(len(chars))
        self.sampling_mask[0] = float("-inf")

    @property
    def busy(self) -> bool:
        """Whether there is work: rows to decode or prompts to encode."""
        return bool(self.rows or self.prompts)

    def reserved(self) -> int:
        """Rows taken, counting those of the generation jobs still being encoded."""
        return len(self.rows) + self.prompts.rows_reserved()

    def admit(self, jobs: Sequence[Job]) -> None:
        """Take jobs in: each starts from the longest cached prefix of its prompt, and the next steps encode
        the rest. Next-token jobs then get their logits and are done; generation jobs add `n` rows that
        start from their prompt's state."""
        now = time.monotonic()
        for job in jobs:
            req = job.request
            late = "deadline" if req is not None and req.expired(now) else None
            if lifecycle.draining(now):
                late = "shutdown"
            if not job.cancelled and req is not None and late is not None:
                # It waited for room past its deadline (or the server's): it ends as documented, with nothing
                # generated.
                for index in range(req.n):
                    job.results.put(Delta(index, "", [], late, 0, 0.0))
                job.results.put(FINISHED)
                job.cancel()
        for job in jobs:
            if not job.cancelled:
                self.prompts.add(job)

    def _start(self, encoded: list[_Encoding]) -> None:
        """Next-token jobs get their logits; generation jobs join the batch as `n` rows each."""
        joining: list[CachedState] = []
        for e in encoded:
            job, req, state = e.job, e.job.request, e.encoded()
            if req is None:
                job.results.put(state.logits.clone())
                job.results.put(FINISHED)
                continue
            for index, generator in enumerate(make_generators(req.seed, req.n)):
                counts = torch.zeros(len(self.chars)) if req.params.penalized else None
                self.rows.append(_Row(job, req, index, generator, StopMatcher(req.stop), counts))
                joining.append(state)
        if joining:
            h, c = torch.stack([s.h for s in joining], dim=1), torch.stack([s.c for s in joining], dim=1)
            logits = torch.stack([s.logits for s in joining])
            if self.logits.numel():
                h, c = torch.cat([self.h, h], dim=1), torch.cat([self.c, c], dim=1)
                logits = torch.cat([self.logits, logits])
            self.h, self.c, self.logits = h, c, logits

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.h = self.c = self.logits = torch.empty(0)
            return
        index = torch.tensor(keep)
        self.h, self.c, self.logits = self.h[:, index], self.c[:, index], self.logits[index]

    @torch.inference_mode()
    def step(self) -> int:
        """Encode (a chunk of) the waiting prompts, then sample a character for every row, deliver it, and
        advance the rows that go on; returns the rows decoded."""
        if self.prompts:
            self._start(self.prompts.advance())
        self._keep([i for i, row in enumerate(self.rows) if not row.job.cancelled])
        if not self.rows:
            return 0
        decoded = len(self.rows)
        ids = self._sample()
        id_list = ids.tolist()
        tokens = self._scored(ids, id_list)
        if self.on_generated is not None:
            self.on_generated(decoded)
        now = time.monotonic()
        for i, (row, token_id, token) in enumerate(zip(self.rows, id_list, tokens, strict=True)):
            if (ending := row.take(token_id, token, now)) is not None:
                row.finish(*ending, self._stopped_at(i, row, token_id))
        going_on = [i for i, row in enumerate(self.rows) if not row.finished]
        self._keep(going_on)
        if self.rows:
            self.logits = self.kernel(ids[going_on], self.h, self.c)
        return decoded

    def _sample(self) -> torch.Tensor:
        """One draw per row from its own generator (see `choose`), so a row's characters do not
        depend on what else is in the batch."""
        adjusted = self.logits + self.sampling_mask
        penalized = [(i, row.counts, row.request.params) for i, row in enumerate(self.rows) if row.counts is not None]
        if penalized:
            index = torch.tensor([i for i, _, _ in penalized])
            counts = torch.stack([counts for _, counts, _ in penalized])
            presence = torch.tensor([p.presence_penalty for _, _, p in penalized])[:, None]
            frequency = torch.tensor([p.frequency_penalty for _, _, p in penalized])[:, None]
            adjusted[index] -= presence * (counts > 0) + frequency * counts
        return choose(adjusted, [row.request.params for row in self.rows], [row.generator for row in self.rows])

    def _scored(self, ids: torch.Tensor, id_list: list[int]) -> list[TokenScore]:
        """Each row's sampled character (`ids`, and the same as a list) with its log-probability under the
        model (before temperature, top-k/top-p or penalties) and, where the request asks, the most likely
        alternatives."""
        logprobs = torch.log_softmax(self.logits.double(), dim=-1)
        chosen = logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1).tolist()
        alternatives = top_alternatives(logprobs, [row.request.top_logprobs for row in self.rows], self.chars)
        return [
            TokenScore(self.chars[token_id], logprob, alternative or None)
            for token_id, logprob, alternative in zip(id_list, chosen, alternatives, strict=True)
        ]

    def _stopped_at(self, i: int, row: _Row, token_id: int) -> SessionState | None:
        """Where finishing row `i` stopped (it sampled `token_id` last, not yet read): cached, so that a
        next prompt holding this one and its reply starts after the reply, and returned as the choice's
        session when its request keeps sessions."""
        req = row.request
        cached = self.cache is not None and req.session is None and row.produced >= 2  # else: the prompt's entry
        if not (cached or req.keep_session):
            return None
        h, c = self.h[:, i].clone(), self.c[:, i].clone()
        if self.cache is not None and cached:
            keys = PrefixKeys([*row.job.prompt_ids, *row.generated[:-1]])
            self.cache.put(keys, CachedState(keys.length, h, c, self.logits[i].clone()))
        return SessionState(h, c, token_id) if req.keep_session else None

    def held_jobs(self) -> list[Job]:
        """Every job with prompts being encoded or rows being decoded."""
        return [*self.prompts.jobs(), *(row.job for row in self.rows)]

    def fail(self, exc: BaseException, jobs: Sequence[Job] = ()) -> None:
        """Fail every job in the batch and `jobs` with `exc`, then empty the batch."""
        fail_jobs(exc, [*jobs, *self.prompts.take_all(), *(row.job for row in self.rows)])
        self._keep([])


def run_alone(batch: DecodeBatch, job: Job) -> Generator[Any, None, None]:
    """Serve one job on the calling thread with a batch of its own (batching off); yields its results
    until FINISHED."""
    try:
        batch.admit([job])
        while not (yield from _release(job.waiting())):
            batch.step()
    finally:
        job.cancel()


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

    def _next(self, job: Job) -> Any:
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

    def results(self, job: Job) -> Generator[Any, None, None]:
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
                if (yield from _release([item, *job.waiting()])):
                    return
        finally:
            job.cancel()

    def _admissible(self, batch: DecodeBatch) -> list[Job]:
        reserved = batch.reserved()
        room = self.max_rows - reserved
        taken, self._waiting = split_admissible(self._waiting, room, reserved == 0, time.monotonic())
        for job in taken:
            job.taken_by = threading.current_thread()
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
