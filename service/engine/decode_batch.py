"""The decode batch: the active sequences (one per generation choice) of one process as rows of one
(h, c) state and one logits tensor. Each step samples every row with its own seeded generator, hands the
characters to their requests, drops the rows that finished or were cancelled, and runs one fused LSTM
step for the rest. New prompts join at the next step boundary, encoded by the `PromptEncoder`. With
batching off, a request runs a batch of its own on its own thread (`run_alone`): the same code and the
same arithmetic, one request at a time per batch."""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import torch

from service import lifecycle
from service.engine.jobs import FINISHED, Job, Logits, fail_jobs, release_results
from service.engine.lstm_kernels import FusedStep
from service.engine.observer import IGNORED, EngineObserver
from service.engine.prefix_cache import CachedState, PrefixCache, PrefixKeys
from service.engine.prompt_encoder import Encoding, PromptEncoder
from service.engine.sampling import choose, make_generators
from service.engine.stop_strings import StopMatcher
from service.engine.types import Delta, FinishReason, GenerationRequest, SessionState, TokenScore


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


@dataclass(kw_only=True)
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

    def take(self, token_id: int, token: TokenScore, now: float) -> tuple[FinishReason, list[TokenScore]] | None:
        """Record the row's new character and hand its job the text that no stop string can still claim;
        when the choice ends here, the reason and the text of its last piece instead."""
        self.record(token_id, token.logprob)
        released, stopped = self.matcher.push(token)
        reason = self.finish_reason(stopped, now)
        if reason is None:
            if released:
                self.job.results.put(Delta(index=self.index, text="".join(t.token for t in released), tokens=released))
            return None
        self.finished = True
        return reason, released if stopped else released + self.matcher.flush()

    def finish(self, reason: FinishReason, released: list[TokenScore], session: SessionState | None) -> None:
        """Hand the job the choice's last piece, and FINISHED after the job's last choice."""
        if (trace := self.job.trace) is not None:  # recorded first: the reader may be done at the last piece
            trace.generated_chars += self.produced
            trace.finish_reasons.append(reason)
            if self.job.open_choices == 1:
                trace.finished_ns = time.time_ns()
        text = "".join(t.token for t in released)
        self.job.results.put(
            Delta(
                index=self.index,
                text=text,
                tokens=released,
                finish_reason=reason,
                completion_tokens=self.produced,
                cumulative_logprob=self.cumulative,
                session=session,
            )
        )
        self.job.open_choices -= 1
        if self.job.open_choices == 0:
            self.job.results.put(FINISHED)

    def finish_reason(self, stopped: bool, now: float) -> FinishReason | None:
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
        observer: EngineObserver = IGNORED,
        cache: PrefixCache | None = None,
        prefill_chunk_chars: int = 0,
    ) -> None:
        """`cache` holds the states after prompt prefixes (None: no cache). With `prefill_chunk_chars` > 0, a
        step encodes at most that many ids of each prompt before it decodes (chunked prefill), so a
        long prompt does not pause the batch's streams for its whole encoding; 0 encodes prompts whole."""
        self.kernel = kernel  # the model's decode step and prompt encoder
        self.chars = chars
        self.observer = observer  # hears of every decode step and prompt batch
        self.cache = cache
        self.prompts = PromptEncoder(kernel, observer, cache, prefill_chunk_chars)  # admitted, not yet encoded
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
            late: FinishReason | None = "deadline" if req is not None and req.expired(now) else None
            if lifecycle.draining(now):
                late = "shutdown"
            if not job.cancelled and req is not None and late is not None:
                # It waited for room past its deadline (or the server's): it ends as documented, with nothing
                # generated.
                for index in range(req.n):
                    job.results.put(
                        Delta(
                            index=index,
                            text="",
                            tokens=[],
                            finish_reason=late,
                            completion_tokens=0,
                            cumulative_logprob=0.0,
                        )
                    )
                job.results.put(FINISHED)
                job.cancel()
        for job in jobs:
            if not job.cancelled:
                self.prompts.add(job)

    def _start(self, encoded: list[Encoding]) -> None:
        """Next-token jobs get their logits; generation jobs join the batch as `n` rows each."""
        joining: list[CachedState] = []
        for e in encoded:
            job, req, state = e.job, e.job.request, e.encoded()
            if req is None:
                if job.trace is not None:
                    job.trace.finished_ns = time.time_ns()
                job.results.put(Logits(state.logits.clone()))
                job.results.put(FINISHED)
                continue
            if job.trace is not None:
                job.trace.decode_started_ns = time.time_ns()
            for index, generator in enumerate(make_generators(req.seed, req.n)):
                counts = torch.zeros(len(self.chars)) if req.params.penalized else None
                self.rows.append(
                    _Row(
                        job=job,
                        request=req,
                        index=index,
                        generator=generator,
                        matcher=StopMatcher(req.stop),
                        counts=counts,
                    )
                )
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
        self.observer.generated(decoded)
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
            self.cache.put(keys, CachedState(length=keys.length, h=h, c=c, logits=self.logits[i].clone()))
        return SessionState(h, c, token_id) if req.keep_session else None

    def held_jobs(self) -> list[Job]:
        """Every job with prompts being encoded or rows being decoded."""
        return [*self.prompts.jobs(), *(row.job for row in self.rows)]

    def fail(self, exc: BaseException, jobs: Sequence[Job] = ()) -> None:
        """Fail every job in the batch and `jobs` with `exc`, then empty the batch."""
        fail_jobs(exc, [*jobs, *self.prompts.take_all(), *(row.job for row in self.rows)])
        self._keep([])


def run_alone(batch: DecodeBatch, job: Job) -> Generator[Delta | Logits, None, None]:
    """Serve one job on the calling thread with a batch of its own (batching off); yields its results
    until FINISHED."""
    try:
        batch.admit([job])
        while not (yield from release_results(job.waiting())):
            batch.step()
    finally:
        job.cancel()
