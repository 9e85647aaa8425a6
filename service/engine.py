"""The inference engine: loads the artifacts once and answers requests. No Flask in here.

Each public method follows the handler shape: preprocess (text -> ids), inference under
`torch.inference_mode`, postprocess (tensors -> plain Python results).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.model import CLASSIFIER_DIR, LM_DIR, WEIGHTS_FILE, LoadedModels, load_artifacts
from service.sampling import SamplingParams, choose, make_generators

LN2 = math.log(2.0)
LM_ID = "char-lstm"
CLASSIFIER_ID = "mlp-classifier"


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
class TokenScore:
    token: str
    logprob: float
    top_logprobs: dict[str, float] | None = None  # the most likely characters at this position


@dataclass
class TextScore:
    text: str
    n_chars: int
    logprob: float
    bits_per_char: float
    perplexity: float
    tokens: list[TokenScore]


@dataclass
class Classification:
    label: str
    probabilities: dict[str, float]


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    tokens: list[TokenScore] = field(default_factory=list)
    cumulative_logprob: float = 0.0


@dataclass
class Generation:
    choices: list[Choice]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)


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


class Engine:
    def __init__(self, models: LoadedModels, on_generated: Callable[[int], None] | None = None) -> None:
        """`on_generated(k)` is called after every generation step with the k characters it produced."""
        self.models = models
        self.on_generated = on_generated
        self.lm = models.lm
        self.vocab = models.vocab
        self.classifier = models.classifier
        self.labels = models.labels
        # Generation never emits U+FFFD: it stands for "some unknown character", not for itself.
        self._sampling_mask = torch.zeros(self.vocab.size)
        self._sampling_mask[0] = float("-inf")

    @classmethod
    def from_dir(cls, artifacts_dir: Path | str, on_generated: Callable[[int], None] | None = None) -> Engine:
        return cls(load_artifacts(artifacts_dir), on_generated)

    # ------------------------------------------------------------------ metadata

    def describe_models(self) -> list[dict[str, Any]]:
        """OpenAI-style model entries with metadata; hashes come from the verified manifest."""
        manifest = self.models.manifest
        created = int(time.mktime(time.strptime(manifest.get("created", "1970-01-01T00:00:00Z"), "%Y-%m-%dT%H:%M:%SZ")))
        metrics = manifest.get("metrics", {})
        lm_metrics = metrics.get("lm", {})
        clf_metrics = metrics.get("classifier", {})
        return [
            {
                "id": LM_ID,
                "object": "model",
                "created": created,
                "owned_by": "local",
                "kind": "char-lstm-lm",
                "vocab_size": self.vocab.size,
                "parameters": self.lm.num_parameters(),
                "architecture": vars(self.lm.config),
                "metrics": {k: lm_metrics.get(k) for k in ("test_bpc", "val_bpc")}
                | {"ppmd_test_bpc": lm_metrics.get("ppmd", {}).get("bpc")},
                "artifact_sha256": manifest["files"][f"{LM_DIR}/{WEIGHTS_FILE}"],
                "manifest_sha256": self.models.digest,
            },
            {
                "id": CLASSIFIER_ID,
                "object": "model",
                "created": created,
                "owned_by": "local",
                "kind": "mlp-classifier",
                "labels": self.labels,
                "parameters": self.classifier.num_parameters(),
                "metrics": {k: clf_metrics.get(k) for k in ("mlp", "tfidf_logreg", "majority") if k in clf_metrics},
                "artifact_sha256": manifest["files"][f"{CLASSIFIER_DIR}/{WEIGHTS_FILE}"],
                "manifest_sha256": self.models.digest,
            },
        ]

    # ------------------------------------------------------------------ helpers

    def prompt_ids(self, text: str) -> list[int]:
        return [self.vocab.bos_id, *self.vocab.encode(text)]

    # ------------------------------------------------------------------ endpoints

    @torch.inference_mode()
    def next_token(self, text: str, top_k: int) -> NextToken:
        logits, _ = self.lm.prefill([self.prompt_ids(text)])
        logprobs = torch.log_softmax(logits[0].double(), dim=-1)
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

    @torch.inference_mode()
    def score(self, texts: Sequence[str], include_tokens: bool, top_logprobs: int = 0) -> list[TextScore]:
        """Log-probability of every character given all before it, the first from the start state.

        The texts run as one right-padded batch; per-token values are float64 and the total
        is their sum, so the two always agree.
        """
        ids = [self.vocab.encode(t) for t in texts]
        length = max(len(i) for i in ids)
        inputs = torch.zeros((len(ids), length), dtype=torch.long)
        targets = torch.zeros((len(ids), length), dtype=torch.long)
        for row, seq in enumerate(ids):
            inputs[row, 0] = self.vocab.bos_id
            inputs[row, 1 : len(seq)] = torch.tensor(seq[:-1], dtype=torch.long)
            targets[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        logits, _, _ = self.lm(inputs)
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        results = []
        for row, text in enumerate(texts):
            values = picked[row, : len(text)].tolist()
            alternatives = self.top_alternatives(logprobs[row, : len(text)], top_logprobs if include_tokens else 0)
            total = math.fsum(values)
            n = len(text)
            results.append(
                TextScore(
                    text=text,
                    n_chars=n,
                    logprob=total,
                    bits_per_char=-total / n / LN2,
                    perplexity=math.exp(-total / n),
                    tokens=[
                        TokenScore(ch, lp, alt or None) for ch, lp, alt in zip(text, values, alternatives, strict=True)
                    ]
                    if include_tokens
                    else [],
                )
            )
        return results

    @torch.inference_mode()
    def classify(self, texts: Sequence[str]) -> list[Classification]:
        features = self.lm.pooled_features([self.prompt_ids(t) for t in texts])
        logits, _ = self.classifier(features)
        probs = torch.softmax(logits.double(), dim=-1)
        results = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            results.append(Classification(self.labels[best], dict(zip(self.labels, row, strict=True))))
        return results

    def top_alternatives(self, logprobs: torch.Tensor, k: int) -> list[dict[str, float]]:
        """For each row of (N, V) log-probabilities, its k most likely characters."""
        if k <= 0:
            return [{} for _ in range(logprobs.size(0))]
        top = torch.topk(logprobs, min(k, self.vocab.size), dim=-1)
        return [
            {self.vocab.chars[i]: lp for lp, i in zip(values, indices, strict=True)}
            for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]

    def stream(self, req: GenerationRequest) -> Iterator[Delta]:
        """Generate `req.n` continuations stepped together as one batch, yielding text as it is released.

        Closing the iterator (a client that went away) stops the generation at once.
        """
        n, params = req.n, req.params
        generators = make_generators(req.seed, n)
        matchers = [StopMatcher(req.stop) for _ in range(n)]
        finished = [False] * n
        produced = [0] * n
        cumulative = [0.0] * n
        counts = torch.zeros(n, self.vocab.size)
        penalized = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0

        def sample(logits: torch.Tensor) -> torch.Tensor:
            adjusted = logits + self._sampling_mask
            if penalized:
                adjusted = adjusted - params.presence_penalty * (counts > 0) - params.frequency_penalty * counts
            return choose(adjusted, params, generators)

        with torch.inference_mode():
            logits, state = self.lm.prefill([self.prompt_ids(req.prompt)])
            logits = logits.expand(n, -1).contiguous()
            state = (state[0].expand(-1, n, -1).contiguous(), state[1].expand(-1, n, -1).contiguous())
            for ids, step_logits in self.lm.generate(logits, state, req.max_tokens, sample):
                counts[torch.arange(n), ids] += 1
                logprobs = torch.log_softmax(step_logits.double(), dim=-1)
                chosen = logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1).tolist()
                alternatives = self.top_alternatives(logprobs, req.top_logprobs)
                if self.on_generated is not None:
                    self.on_generated(finished.count(False))
                for row, token_id in enumerate(ids.tolist()):
                    if finished[row]:
                        continue
                    produced[row] += 1
                    cumulative[row] += chosen[row]
                    token = TokenScore(self.vocab.chars[token_id], chosen[row], alternatives[row] or None)
                    released, stopped = matchers[row].push(token)
                    out_of_time = req.deadline is not None and time.monotonic() >= req.deadline
                    if stopped or produced[row] == req.max_tokens or out_of_time:
                        finished[row] = True
                        released += [] if stopped else matchers[row].flush()
                        reason = "stop" if stopped else "length" if produced[row] == req.max_tokens else "deadline"
                        text = "".join(t.token for t in released)
                        yield Delta(row, text, released, reason, produced[row], cumulative[row])
                    elif released:
                        yield Delta(row, "".join(t.token for t in released), released)
                if all(finished):
                    return

    def generate(self, req: GenerationRequest) -> Generation:
        choices = [Choice(i) for i in range(req.n)]
        for delta in self.stream(req):
            choice = choices[delta.index]
            choice.text += delta.text
            choice.tokens += delta.tokens
            if delta.finish_reason:
                choice.finish_reason = delta.finish_reason
                choice.completion_tokens = delta.completion_tokens
                choice.cumulative_logprob = delta.cumulative_logprob
        return Generation(choices, prompt_tokens=len(req.prompt))
