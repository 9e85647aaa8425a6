"""Sampling: every row drawn from its own generator, filters applied per row, the right distribution."""

from __future__ import annotations

import pytest
import torch

from service.engine.sampling import SamplingParams, choose, make_generators

pytestmark = pytest.mark.unit  # no server: `pytest -m unit` runs these in about a minute

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, float("-inf"), -3.0])  # index 5 can never be drawn


def draws(params: SamplingParams, count: int, seed: int = 0) -> torch.Tensor:
    """`count` draws for LOGITS, one per row, each row with its own generator."""
    return choose(LOGITS.expand(count, -1), [params] * count, make_generators(seed, count))


def test_draws_follow_the_tempered_distribution() -> None:
    temperature = 0.8
    ids = draws(SamplingParams(temperature=temperature), 40_000)
    observed = torch.bincount(ids, minlength=len(LOGITS)).double() / len(ids)
    expected = torch.softmax(LOGITS.double() / temperature, dim=-1)
    torch.testing.assert_close(observed, expected, rtol=0, atol=0.01)
    assert observed[5] == 0


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.5), {0}),  # the best character alone holds 0.56 of the mass
        (SamplingParams(top_p=0.8), {0, 1, 2}),  # the best two hold 0.77, short of 0.8: the third one is needed
        (SamplingParams(temperature=0.0), {0}),
        (SamplingParams(top_p=1e-300), {0}),
        (SamplingParams(temperature=5e-324), {0}),
    ],
)
def test_filters_limit_what_is_drawn(params: SamplingParams, allowed: set[int]) -> None:
    drawn = set(draws(params, 3_000).tolist())
    assert drawn == allowed


def test_each_row_is_independent_of_the_rest_of_the_batch() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 30, generator=generator) * 3
    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=4),
        SamplingParams(temperature=1.3, top_p=0.6),
        SamplingParams(top_k=10, top_p=0.9),
        SamplingParams(),
    ]
    for _ in range(20):
        together = choose(logits, params, make_generators(7, 6))
        for row in range(6):
            alone = choose(logits[row : row + 1], [params[row]], make_generators(7 + row, 1))
            assert alone.item() == together[row].item()
        logits = logits.roll(1, dims=-1)


def test_a_seed_reproduces_its_draws() -> None:
    first = draws(SamplingParams(temperature=1.1, top_k=5), 64, seed=42)
    assert torch.equal(first, draws(SamplingParams(temperature=1.1, top_k=5), 64, seed=42))
    assert not torch.equal(first, draws(SamplingParams(temperature=1.1, top_k=5), 64, seed=43))
