"""Sampling as small functions over a batch of logits, one seeded generator per row."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(kw_only=True, frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None  # keep the k most likely characters
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p
    presence_penalty: float = 0.0  # subtracted from the logit of every character already generated
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence in the generated text

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the counts of the characters generated so far."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def make_generators(seed: int | None, n: int) -> list[torch.Generator]:
    """Row i uses seed + i, so choice i of a request equals choice 0 of a request with seed + i.
    Without a seed, fresh randomness is drawn per request."""
    base = secrets.randbits(62) if seed is None else seed
    return [torch.Generator().manual_seed((base + i) % (1 << 64)) for i in range(n)]


def choose(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Next ids (B,) for logits (B, V), row i sampled with `params[i]` from its own `generators[i]`.

    Greedy rows (temperature 0) take the argmax and draw nothing. The others are filtered and
    sampled together: each row's draw is the inverse of its own cumulative distribution at one
    uniform number from its own generator. Every operation is row-wise, so a row's character
    never depends on the other rows.
    """
    ids = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if p.temperature != 0.0]
    if not sampled:
        return ids
    rows = torch.tensor(sampled)
    chosen = [params[i] for i in sampled]
    # The smallest normal float32 as a floor: a smaller temperature rounds to 0, and shifting the row
    # maximum to 0 first keeps the best character at 0 and the rest going to -inf (never 0/0 or inf - inf).
    temperature = torch.tensor([max(p.temperature, torch.finfo(torch.float32).tiny) for p in chosen])
    x = logits[rows].float()
    x = (x - x.amax(dim=-1, keepdim=True)) / temperature[:, None]
    vocab = x.size(-1)
    top_k = [min(p.top_k or vocab, vocab) for p in chosen]
    top_p = [p.top_p for p in chosen]
    if min(top_k) < vocab or min(top_p) < 1.0:
        x = x.masked_fill(~_kept(x, top_k, top_p), float("-inf"))
    # The draw runs in vocabulary order for every row, filtered or not, so that a row's character
    # does not depend on whether another row in the batch asked for filtering.
    cumulative = torch.softmax(x.double(), dim=-1).cumsum(dim=-1)
    draws = torch.cat([torch.rand(1, generator=generators[i], dtype=torch.float64) for i in sampled])
    # A threshold in (0, total], from 1 - u with u in [0, 1): the first position whose cumulative mass
    # reaches it always has a positive probability (a zero-probability position repeats the mass
    # before it), and a draw can never run past the end.
    threshold = (1.0 - draws) * cumulative[:, -1]
    position = torch.searchsorted(cumulative, threshold[:, None]).clamp_max(vocab - 1)
    ids[rows] = position.squeeze(-1)
    return ids


def _kept(x: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> torch.Tensor:
    """Which characters survive each row's top-k, then its nucleus (top-p), filter: (B, V) booleans."""
    ordered, order = torch.sort(x, dim=-1, descending=True, stable=True)
    kth = ordered.gather(-1, torch.tensor(top_k)[:, None] - 1)
    keep = ordered >= kth  # ties with the k-th character stay
    if min(top_p) < 1.0:
        probs = torch.softmax(ordered.masked_fill(~keep, float("-inf")).double(), dim=-1)
        p = torch.tensor(top_p, dtype=torch.float64)[:, None]
        # Drop what lies wholly beyond top_p. top_p = 1 drops nothing, whatever the rounding, and the
        # best character always stays (a top_p below float32's range would otherwise drop them all).
        keep &= ~((probs.cumsum(dim=-1) - probs >= p) & (p < 1.0))
        keep[:, 0] = True
    return torch.empty_like(keep).scatter_(-1, order, keep)
