"""Scoring texts (/v1/score, echoed prompts) with the prefix cache: every character's log-probability
given all before it, each text resuming after the longest checkpoint the cache holds with its values.
No Flask in here.

The prefix cache on /v1/score: a row's keys are those of its inputs (the start symbol, then every character
but the last) at the checkpoints only, so that every row runs from a checkpoint and meets its next ones at
multiples of CHECKPOINT steps: the LSTM runs in pieces of CHECKPOINT steps, and the state after each is
cached with the log-probabilities of the characters before.
"""

from __future__ import annotations

import array
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from seqmodels.networks import LN2, AdaptConfig, LSTMState, Vocab
from service.engine.decode_batch import top_alternatives
from service.engine.lstm_kernels import FusedStep
from service.engine.prefix_cache import CHECKPOINT, CachedState, PrefixCache, PrefixKeys
from service.engine.types import SequenceState, TokenScore


@dataclass(kw_only=True)
class TextScore:
    text: str
    n_chars: int
    logprob: float
    bits_per_char: float
    perplexity: float
    tokens: list[TokenScore]


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


class Scorer:
    """Scores batches of texts through a kernel's whole-sequence pass, using and feeding a prefix cache."""

    def __init__(self, kernel: FusedStep, vocab: Vocab, prefix_cache: PrefixCache | None) -> None:
        self.kernel = kernel
        self.vocab = vocab
        self.prefix_cache = prefix_cache

    @torch.inference_mode()
    def score(self, texts: Sequence[str], include_tokens: bool, top_logprobs: int) -> list[TextScore]:
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

    @torch.inference_mode()
    def continue_sequence(self, state: SequenceState | None, text: str) -> tuple[SequenceState, list[float]]:
        """Read `text` after `state` (None: a sequence's start, from the start symbol): the state after it and
        the log-probability of each of its characters given everything the sequence read before. Reading a
        text in pieces gives what reading it whole gives."""
        ids = self.vocab.encode(text)
        if state is None:
            inputs, initial = [self.vocab.bos_id, *ids], None
        else:
            inputs, initial = ids, (state.h.unsqueeze(1), state.c.unsqueeze(1))
        if state is not None and not ids:
            return state, []
        logits, (h, c) = self.kernel.sequence(torch.tensor([inputs], dtype=torch.long), initial)
        logits = logits[0]
        before = logits[:-1] if state is None else torch.cat([state.logits.unsqueeze(0), logits[:-1]])
        picked = torch.log_softmax(before.double(), dim=-1).gather(-1, torch.tensor(ids).unsqueeze(-1))
        return SequenceState(h=h[:, 0].clone(), c=c[:, 0].clone(), logits=logits[-1].clone()), picked[:, 0].tolist()

    def adapted(
        self, texts: Sequence[str], include_tokens: bool, adapt: AdaptConfig, deadline: float | None
    ) -> list[TextScore]:
        """Dynamic evaluation (see `CharLSTM.adapted_logprobs`), each text on its own fresh copy of the
        weights: what one text teaches does not reach another. TimeoutError past `deadline`."""
        results = []
        lm = self.kernel.lm
        for text in texts:
            ids = self.vocab.encode(text)
            inputs = torch.tensor([[self.vocab.bos_id, *ids[:-1]]])
            values = lm.adapted_logprobs(inputs, torch.tensor([ids]), adapt, deadline, autocast=self.kernel.dtype)
            results.append(text_score(text, values.tolist(), [{}] * len(text), include_tokens))
        return results

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
            h, c = self.kernel.lm.zero_state(len(cached))
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
                    length=length,
                    h=h[:, row].clone(),
                    c=c[:, row].clone(),
                    logits=logits[steps - 1].clone(),
                    logprobs=array.array("d", values[: length - 1]),
                )
                self.prefix_cache.put(keys, entry)
