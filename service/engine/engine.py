"""The inference engine: loads the artifacts once and answers requests. No Flask in here.

Each public method follows the handler shape: preprocess (text -> ids), inference under
`torch.inference_mode`, postprocess (tensors -> plain Python results).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from seqmodels.artifacts import LoadedModels, load_artifacts
from seqmodels.networks import LN2
from service.engine import usage
from service.engine.decode_batch import DecodeBatch, run_alone
from service.engine.jobs import Job, Logits, merge_deltas
from service.engine.lstm_kernels import FusedStep, off_the_scheduler
from service.engine.observer import IGNORED, EngineObserver
from service.engine.prefix_cache import PrefixCache
from service.engine.scheduler import Scheduler
from service.engine.scoring import Scorer, TextScore, text_score
from service.engine.stop_strings import StopMatcher
from service.engine.types import Delta, GenerationRequest, SequenceState, SessionState, TokenScore
from service.settings import Settings

__all__ = [
    "AdaptationUnavailable",
    "ClassifierUnavailable",
    "Delta",
    "Engine",
    "EngineOptions",
    "GenerationRequest",
    "PrefixCache",
    "SessionState",
    "StopMatcher",
    "TextScore",
    "TokenScore",
]


@dataclass
class Candidate:
    token: str
    prob: float
    logprob: float


@dataclass
class NextToken:
    candidates: list[Candidate]
    entropy_bits: float


class AdaptationUnavailable(Exception):
    """`adapt` was asked of an artifact that carries no dynamic-evaluation settings."""


class ClassifierUnavailable(Exception):
    """Classification was asked of an artifact trained without a classifier."""


@dataclass
class Classification:
    label: str
    probabilities: dict[str, float]


@dataclass
class Generation:
    choices: list[Delta]  # per choice, in order: all its text and tokens, with its finish_reason
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)


@dataclass(kw_only=True, frozen=True)
class EngineOptions:
    """How an engine runs, in one object (`from_settings` reads them from the service's Settings)."""

    batching: bool = True  # share a scheduler that steps every request's sequences together; False: each alone
    max_batch_rows: int = 64  # sequences decoded together; later jobs wait for rows to free up
    dtype: torch.dtype = torch.float32  # the weights' precision in every pass (see service.engine.lstm_kernels)
    scoring_slots: int = 1  # score and classify calls running at once (one per torch thread)
    batch_gather_seconds: float = 0.005  # an idle scheduler with concurrent clients waits this long for prompts
    stream_interval_seconds: float = 0.005  # after a stream's first piece, it takes what accumulated this often
    prefill_chunk_chars: int = 0  # > 0: long prompts are encoded this many characters per step, between decode steps

    @classmethod
    def from_settings(cls, settings: Settings, dtype: torch.dtype) -> EngineOptions:
        return cls(
            batching=settings.batching,
            max_batch_rows=settings.max_batch_rows,
            dtype=dtype,
            scoring_slots=settings.torch_threads,
            batch_gather_seconds=settings.batch_gather_ms / 1000,
            stream_interval_seconds=settings.stream_interval_ms / 1000,
            prefill_chunk_chars=settings.prefill_chunk_chars,
        )


@torch.inference_mode()
def ranked(logits: torch.Tensor, top_k: int, chars: Sequence[str]) -> NextToken:
    """The `top_k` most likely next characters after `logits` (V,), and the distribution's entropy."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    top = torch.topk(logprobs, min(top_k, len(chars)))
    entropy_bits = float(-(logprobs.exp() * logprobs).sum()) / LN2
    return NextToken(
        candidates=[
            Candidate(chars[i], math.exp(lp), lp)
            for lp, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ],
        entropy_bits=entropy_bits,
    )


class Engine:
    def __init__(
        self,
        models: LoadedModels,
        options: EngineOptions = EngineOptions(),
        prefix_cache: PrefixCache | None = None,
        observer: EngineObserver = IGNORED,
    ) -> None:
        """`prefix_cache` keeps the states after prompt prefixes for generation, next-token and score (None:
        off). `observer` hears of every decode step and prompt batch (the prefix cache has its own).

        With `options.batching`, next-token and generation requests of this process share a background
        scheduler that steps all their sequences together; without it, each request computes alone on its
        own thread (the same arithmetic, batch by batch).
        """
        self.models = models
        self.options = options
        self.observer = observer
        self.lm = models.lm
        self.vocab = models.vocab
        self.classifier = models.classifier
        self.labels = models.labels
        self.kernel = FusedStep(self.lm, options.dtype)
        self.prefix_cache = prefix_cache
        self.scorer = Scorer(self.kernel, self.vocab, prefix_cache)
        self.scheduler = (
            Scheduler(
                self.new_batch, options.max_batch_rows, options.batch_gather_seconds, options.stream_interval_seconds
            )
            if options.batching
            else None
        )
        # Scoring and classification run on the request's own thread, one whole batch per call. More
        # of them at once than the worker has torch threads only adds activation memory (a batch's
        # activations for every position of every text), so they take turns for these slots.
        self._scoring_slots = threading.BoundedSemaphore(options.scoring_slots)

    @classmethod
    def from_dir(cls, artifacts_dir: Path | str, options: EngineOptions = EngineOptions()) -> Engine:
        return cls(load_artifacts(artifacts_dir), options)

    def new_batch(self) -> DecodeBatch:
        return DecodeBatch(
            self.kernel,
            self.vocab.chars,
            self.observer,
            self.prefix_cache,
            self.options.prefill_chunk_chars,
        )

    def run(self, job: Job) -> Generator[Delta | Logits, None, None]:
        """The job's results, from the shared scheduler or computed alone; closing this cancels the job."""
        if self.scheduler is not None:
            return self.scheduler.results(job)
        return run_alone(self.new_batch(), job)

    def close(self) -> None:
        """Let the scheduler thread end and let go of the pod-wide cache's table (the engine of a model version
        being unloaded, with no requests): its file goes with its last user in the server."""
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.prefix_cache is not None and self.prefix_cache.shared is not None:
            self.prefix_cache.shared.close()

    def memory_bytes(self) -> int:
        """What this engine holds: the networks' weights, the kernels' packed copies of them, the prefix
        cache's bound (it grows to it) and the shared table it reserved (counted by every worker that maps it,
        so that MODEL_MEMORY_MB bounds a worker's share of the pod's memory whoever made the table)."""
        modules = [m for m in (self.lm, self.classifier) if m is not None]
        weights = sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])
        cache = self.prefix_cache
        cached = 0 if cache is None else cache.max_bytes + (cache.shared.reserved_bytes if cache.shared else 0)
        return weights + self.kernel.nbytes + cached

    def prompt_ids(self, text: str) -> list[int]:
        return [self.vocab.bos_id, *self.vocab.encode(text)]

    def next_token_logits(self, text: str) -> torch.Tensor:
        """The logits (V,) of the character after `text`, computed with every other request's prompts."""
        results = self.run(Job.next_token(self.prompt_ids(text)))
        answer = next(results)
        results.close()
        assert isinstance(answer, Logits)
        return answer.values

    def next_token(self, text: str, top_k: int) -> NextToken:
        return ranked(self.next_token_logits(text), top_k, self.vocab.chars)

    def score(
        self,
        texts: Sequence[str],
        include_tokens: bool,
        top_logprobs: int = 0,
        adapt: bool = False,
        deadline: float | None = None,
    ) -> list[TextScore]:
        """With `adapt`, dynamic evaluation (see `CharLSTM.adapted_logprobs`) with the artifact's settings;
        AdaptationUnavailable where the artifact has none, TimeoutError past `deadline`."""
        if adapt and self.models.adapt.lr <= 0:
            raise AdaptationUnavailable("this model's artifact has no dynamic-evaluation settings")
        with self._scoring_slots:
            if adapt:
                return off_the_scheduler(
                    lambda: self.scorer.adapted(texts, include_tokens, self.models.adapt, deadline)
                )
            return off_the_scheduler(lambda: self.scorer.score(texts, include_tokens, top_logprobs))

    def warm_up(self, batch_sizes: Sequence[int], prompt_chars: int) -> float:
        """Run synthetic requests through every path a request takes, at `batch_sizes` prompts (and decode
        rows) at once, so that real requests do not pay the first calls' costs (kernel primitives built per
        shape, allocator growth, lazily imported code); returns the seconds it took. The synthetic prompts
        are the vocabulary's characters in turn, shorter than a prefix-cache checkpoint; a generation's
        state may still take an entry or two of the cache, which real prompts soon evict."""
        started = time.perf_counter()
        chars = [c for c in self.vocab.chars if c.isprintable() and len(c) == 1] or ["a"]
        for size in batch_sizes:
            prompts = ["".join(chars[(i + j) % len(chars)] for j in range(prompt_chars)) for i in range(size)]
            with ThreadPoolExecutor(max_workers=size, thread_name_prefix="warmup") as pool:
                list(pool.map(self.next_token_logits, prompts))  # encoded together, as concurrent requests are
            rows = min(size, self.options.max_batch_rows)
            self.generate(GenerationRequest(prompt=prompts[0], max_tokens=4, n=rows, seed=0))  # `rows` decoded
            self.score(prompts[: min(size, 8)], include_tokens=False)
            if self.classifier is not None:
                self.classify(prompts[: min(size, 8)])
        return time.perf_counter() - started

    def continue_sequence(self, state: SequenceState | None, text: str) -> tuple[SequenceState, TextScore]:
        """A sequence's next piece of text (see `Scorer.continue_sequence`): the state after it, and its score
        given everything the sequence read before."""
        with self._scoring_slots:
            after, values = off_the_scheduler(lambda: self.scorer.continue_sequence(state, text))
        return after, text_score(text, values, [{}] * len(text), include_tokens=False)

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        if self.classifier is None:
            raise ClassifierUnavailable("this model was trained without a classifier")
        with self._scoring_slots:
            return off_the_scheduler(lambda: self._classify(texts))

    @torch.inference_mode()
    def _classify(self, texts: Sequence[str]) -> list[Classification]:
        assert self.classifier is not None
        logits, _ = self.classifier(self.classifier.featurize(texts))
        probs = torch.softmax(logits.double(), dim=-1)
        results = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            results.append(Classification(self.labels[best], dict(zip(self.labels, row, strict=True))))
        return results

    def stream(self, req: GenerationRequest) -> Generator[Delta, None, None]:
        """Generate `req.n` continuations, yielding text as it is released. The choices step
        together, and with batching alongside every other request's sequences.

        Closing the iterator (a client that went away) takes its sequences out of the batch
        before the next step.
        """
        if req.session is None:
            job = Job.generation(self.prompt_ids(req.prompt), req)
        else:  # the session's last character has not been read yet: it comes first
            job = Job.generation([req.session.next_id, *self.vocab.encode(req.prompt)], req)
        results = self.run(job)
        try:
            for item in results:
                assert isinstance(item, Delta)  # a generation job's results are deltas
                usage.add(item.completion_tokens)
                yield item
        finally:
            results.close()

    def generate(self, req: GenerationRequest) -> Generation:
        """The whole generation: each choice's pieces merged as a stream's reader merges them."""
        merged = {delta.index: delta for delta in merge_deltas(list(self.stream(req)))}
        choices = [merged.get(i, Delta(index=i, text="", tokens=[])) for i in range(req.n)]
        return Generation(choices, prompt_tokens=len(req.prompt))
