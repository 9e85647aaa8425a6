"""The inference engine: loads the artifacts once and answers requests. No Flask in here.

Each public method follows the handler shape: preprocess (text -> ids), inference under
`torch.inference_mode`, postprocess (tensors -> plain Python results).
"""

from __future__ import annotations

import array
import math
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seqmodels.artifacts import LoadedModels, load_artifacts
from seqmodels.networks import LN2, LSTMState
from service.batching import (
    DecodeBatch,
    Delta,
    GenerationRequest,
    Job,
    Scheduler,
    SessionState,
    StopMatcher,
    TokenScore,
    merge_deltas,
    top_alternatives,
)
from service.kernels import FusedStep
from service.prefix_cache import CHECKPOINT, CachedState, PrefixCache, PrefixKeys

__all__ = [
    "AdaptationUnavailable",
    "ClassifierUnavailable",
    "Delta",
    "Engine",
    "GenerationRequest",
    "PrefixCache",
    "SessionState",
    "StopMatcher",
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


@dataclass
class TextScore:
    text: str
    n_chars: int
    logprob: float
    bits_per_char: float
    perplexity: float
    tokens: list[TokenScore]


class AdaptationUnavailable(Exception):
    """`adapt` was asked of an artifact that carries no dynamic-evaluation settings."""


class ClassifierUnavailable(Exception):
    """Classification was asked of an artifact trained without a classifier."""


def text_score(
    text: str, values: list[float], alternatives: Sequence[dict[str, float]], include_tokens: bool
) -> TextScore:
    """Totals from per-character natural-log probabilities; the total is their exact (fsum) sum."""
    total = math.fsum(values)
    n = len(text)
    tokens = [TokenScore(ch, lp, alt or None) for ch, lp, alt in zip(text, values, alternatives, strict=True)]
    return TextScore(
        text=text,
        n_chars=n,
        logprob=total,
        bits_per_char=-total / n / LN2,
        perplexity=math.exp(-total / n),
        tokens=tokens if include_tokens else [],
    )


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


class Engine:
    def __init__(
        self,
        models: LoadedModels,
        on_generated: Callable[[int], None] | None = None,
        on_prefill: Callable[[int], None] | None = None,
        batching: bool = True,
        max_batch_rows: int = 64,
        dtype: torch.dtype = torch.float32,
        scoring_slots: int = 1,
        batch_gather_seconds: float = 0.005,
        stream_interval_seconds: float = 0.005,
        prefix_cache: PrefixCache | None = None,
        prefill_chunk: int = 0,
    ) -> None:
        """`on_generated(k)` is called after every generation step with the k characters it produced,
        and `on_prefill(k)` after every batch of k prompts is encoded.

        `prefix_cache` keeps the states after prompt prefixes for generation, next-token and score (None:
        off). `prefill_chunk` > 0 encodes long prompts that many characters per step, between decode steps.
        `dtype` is the weights' precision in every pass: prompts, scoring (adaptive scoring too, under
        autocast) and the decode step.

        With `batching`, next-token and generation requests of this process share a background
        scheduler that steps all their sequences together; without it, each request computes alone
        on its own thread (the same arithmetic, batch by batch).
        """
        self.models = models
        self.on_generated = on_generated
        self.on_prefill = on_prefill
        self.lm = models.lm
        self.vocab = models.vocab
        self.classifier = models.classifier
        self.labels = models.labels
        self.kernel = FusedStep(self.lm, dtype)
        self.dtype = dtype
        self.prefix_cache = prefix_cache
        self.prefill_chunk = prefill_chunk
        self.scheduler = (
            Scheduler(self.new_batch, max_batch_rows, batch_gather_seconds, stream_interval_seconds)
            if batching
            else None
        )
        # Scoring and classification run on the request's own thread, one whole batch per call. More
        # of them at once than the worker has torch threads only adds activation memory (about
        # 100 MB for 16 texts of 200 characters), so they take turns for these slots.
        self._scoring_slots = threading.BoundedSemaphore(scoring_slots)

    @classmethod
    def from_dir(cls, artifacts_dir: Path | str, **options: Any) -> Engine:
        return cls(load_artifacts(artifacts_dir), **options)

    def new_batch(self) -> DecodeBatch:
        return DecodeBatch(
            self.kernel, self.vocab.chars, self.on_generated, self.on_prefill, self.prefix_cache, self.prefill_chunk
        )

    def run(self, job: Job) -> Generator[Any, None, None]:
        """The job's results, from the shared scheduler or computed alone; closing this cancels the job."""
        if self.scheduler is not None:
            return self.scheduler.results(job)
        return self.new_batch().run_alone(job)

    def close(self) -> None:
        """Let the scheduler thread end and drop the pod-wide cache's table (the engine of a model version
        being unloaded, with no requests)."""
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.prefix_cache is not None and self.prefix_cache.shared is not None:
            self.prefix_cache.shared.unlink()

    def memory_bytes(self) -> int:
        """What this engine holds: the networks' weights, the kernels' packed copies of them, and the
        prefix cache's bound (it grows to it)."""
        modules = [m for m in (self.lm, self.classifier) if m is not None]
        weights = sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])
        return weights + self.kernel.nbytes + (self.prefix_cache.max_bytes if self.prefix_cache is not None else 0)

    # ------------------------------------------------------------------ helpers

    def prompt_ids(self, text: str) -> list[int]:
        return [self.vocab.bos_id, *self.vocab.encode(text)]

    # ------------------------------------------------------------------ endpoints

    def next_token(self, text: str, top_k: int) -> NextToken:
        results = self.run(Job(self.prompt_ids(text)))
        logits = next(results)
        results.close()
        return self._rank(logits, top_k)

    @torch.inference_mode()
    def _rank(self, logits: torch.Tensor, top_k: int) -> NextToken:
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        k = min(top_k, self.vocab.size)
        top = torch.topk(logprobs, k)
        entropy_bits = float(-(logprobs.exp() * logprobs).sum()) / LN2
        return NextToken(
            candidates=[
                Candidate(self.vocab.chars[i], math.exp(lp), lp)
                for lp, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ],
            entropy_bits=entropy_bits,
        )

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
                return self._adapted_score(texts, include_tokens, deadline)
            return self._score(texts, include_tokens, top_logprobs)

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        if self.classifier is None:
            raise ClassifierUnavailable("this model was trained without a classifier")
        with self._scoring_slots:
            return self._classify(texts)

    @torch.inference_mode()
    def _score(self, texts: Sequence[str], include_tokens: bool, top_logprobs: int) -> list[TextScore]:
        """Log-probability of every character given all before it, the first from the start state.

        The texts run as one right-padded batch; per-token values are float64 and the total
        is their sum, so the two always agree.
        """
        ids = [self.vocab.encode(t) for t in texts]
        # A row starts after its longest cached prefix (cached prefixes keep no alternatives).
        cached = self._scored_prefixes(ids, use=not (include_tokens and top_logprobs))
        skip = [0 if hit is None else hit.length for _, hit in cached]
        length = max(len(seq) - k for seq, k in zip(ids, skip, strict=True))
        inputs = torch.zeros((len(ids), length), dtype=torch.long)
        targets = torch.zeros((len(ids), length), dtype=torch.long)
        for row, (seq, k) in enumerate(zip(ids, skip, strict=True)):
            inputs[row, : len(seq) - k] = torch.tensor([self.vocab.bos_id, *seq[:-1]][k:], dtype=torch.long)
            targets[row, : len(seq) - k] = torch.tensor(seq[k:], dtype=torch.long)
        logits, states = self._run_scored(inputs, [hit for _, hit in cached], any(keys for keys, _ in cached))
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        results = []
        for row, text in enumerate(texts):
            values = self._prefix_values(cached[row][1], ids[row]) + picked[row, : len(text) - skip[row]].tolist()
            self._cache_scored(cached[row][0], skip[row], values, logits[row], states, row)
            wanted = [top_logprobs if include_tokens else 0] * len(text)
            alternatives = top_alternatives(logprobs[row, : len(text)], wanted, self.vocab.chars)
            results.append(text_score(text, values, alternatives, include_tokens))
        return results

    def _adapted_score(self, texts: Sequence[str], include_tokens: bool, deadline: float | None) -> list[TextScore]:
        """Each text on its own fresh copy of the weights: what one text teaches does not reach another."""
        results = []
        for text in texts:
            ids = self.vocab.encode(text)
            inputs = torch.tensor([[self.vocab.bos_id, *ids[:-1]]])
            values = self.lm.adapted_logprobs(
                inputs, torch.tensor([ids]), self.models.adapt, deadline, autocast=self.dtype
            ).tolist()
            results.append(text_score(text, values, [{}] * len(text), include_tokens))
        return results

    # The prefix cache on /v1/score: a row's keys are those of its inputs (the start symbol, then every
    # character but the last) at the checkpoints only, so that every row runs from a checkpoint and
    # meets its next ones at multiples of CHECKPOINT steps: the LSTM runs in pieces of CHECKPOINT
    # steps, and the state after each is cached with the log-probabilities of the characters before.

    def _scored_prefixes(self, ids: list[list[int]], use: bool) -> list[tuple[PrefixKeys | None, CachedState | None]]:
        """Per text: the keys of its inputs (when it reaches a checkpoint), and the longest cached
        checkpoint that has log-probabilities."""
        out: list[tuple[PrefixKeys | None, CachedState | None]] = []
        for seq in ids:
            if self.prefix_cache is None or not use or len(seq) < CHECKPOINT:
                out.append((None, None))
                continue
            keys = PrefixKeys([self.vocab.bos_id, *seq[:-1]])
            out.append((keys, self.prefix_cache.lookup(keys, scored=True)))
        return out

    def _run_scored(
        self, inputs: torch.Tensor, cached: list[CachedState | None], store: bool
    ) -> tuple[torch.Tensor, dict[int, LSTMState]]:
        """Logits (B, T, V) of right-padded `inputs`, each row from its cached state or the zero state, and
        (to `store` them) the states after every CHECKPOINT steps."""
        state = None
        if any(hit is not None for hit in cached):
            h, c = self.lm.zero_state(len(cached))
            for row, hit in enumerate(cached):
                if hit is not None:
                    h[:, row], c[:, row] = hit.h, hit.c
            state = (h, c)
        length = inputs.size(1)
        if not length:  # every text was cached whole
            return torch.empty(len(cached), 0, self.vocab.size), {}
        if not store or length < CHECKPOINT:
            logits, _ = self.kernel.sequence(inputs, state)
            return logits, {}
        pieces, states = [], {}
        for begin in range(0, length, CHECKPOINT):
            piece, state = self.kernel.sequence(inputs[:, begin : begin + CHECKPOINT], state)
            pieces.append(piece)
            states[begin + CHECKPOINT] = state
        return torch.cat(pieces, dim=1), states

    def _prefix_values(self, hit: CachedState | None, seq: list[int]) -> list[float]:
        """The log-probabilities of the characters a cached prefix accounts for: its own, and the one its
        logits predict."""
        if hit is None:
            return []
        assert hit.logprobs is not None
        return [*hit.logprobs, float(torch.log_softmax(hit.logits.double(), dim=-1)[seq[hit.length - 1]])]

    def _cache_scored(
        self,
        keys: PrefixKeys | None,
        skip: int,
        values: list[float],
        logits: torch.Tensor,
        states: dict[int, LSTMState],
        row: int,
    ) -> None:
        """Cache the row's states at the checkpoints it ran through (`logits` (T, V) is the row's)."""
        if keys is None or self.prefix_cache is None:
            return
        for steps, (h, c) in states.items():
            length = skip + steps
            if length % CHECKPOINT == 0 and length <= len(values):
                entry = CachedState(
                    length,
                    h[:, row].clone(),
                    c[:, row].clone(),
                    logits[steps - 1].clone(),
                    array.array("d", values[: length - 1]),
                )
                self.prefix_cache.put(keys, entry)

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
            job = Job(self.prompt_ids(req.prompt), req)
        else:  # the session's last character has not been read yet: it comes first
            job = Job([req.session.next_id, *self.vocab.encode(req.prompt)], req)
        results = self.run(job)
        try:
            yield from results
        finally:
            results.close()

    def generate(self, req: GenerationRequest) -> Generation:
        """The whole generation: each choice's pieces merged as a stream's reader merges them."""
        merged = {delta.index: delta for delta in merge_deltas(list(self.stream(req)))}
        choices = [merged.get(i, Delta(i, "", [])) for i in range(req.n)]
        return Generation(choices, prompt_tokens=len(req.prompt))
