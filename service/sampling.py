"""Sampling as small functions over a batch of logits, one seeded generator per row."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
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


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Shifting the row maximum to 0 first, and flooring the temperature at the dtype's smallest
    normal number (a smaller one rounds to 0), keeps any positive temperature well defined: the best
    character stays at 0 and the rest go towards -inf, never 0/0 or inf - inf."""
    temperature = max(temperature, torch.finfo(logits.dtype).tiny)
    return (logits - logits.amax(dim=-1, keepdim=True)) / temperature


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    if k is None or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: drop the tail whose cumulative probability lies beyond p (the top character always stays)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= p
    drop_sorted[..., 0] = False  # a p below float32's range rounds to 0 and would otherwise drop every character
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def choose(logits: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Next ids (B,) for logits (B, V): argmax when greedy, else one seeded draw per row."""
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
    filtered = top_p_filter(top_k_filter(apply_temperature(logits, params.temperature), params.top_k), params.top_p)
    probs = torch.softmax(filtered.float(), dim=-1)
    return torch.cat([torch.multinomial(probs[row], 1, generator=g) for row, g in enumerate(generators)])
