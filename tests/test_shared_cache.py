"""The pod-wide level of the prefix cache: a table in shared memory that every worker maps. Two engines in
one process stand for two workers; then a real gunicorn server with two workers, on loopback."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

from benchmarks.loadgen import exchange
from benchmarks.servers import metric_total
from seqmodels.artifacts import LoadedModels, load_artifacts
from service.engine import Engine, EngineOptions
from service.prefix_cache import CHECKPOINT, PrefixCache, PrefixKeys
from service.shared_cache import WAYS, SharedStates
from tests.conftest import gunicorn_server

PROMPT = ("KING. " + "Now is the winter of our discontent made glorious summer by this sun of York. " * 12)[:900]


@pytest.fixture(scope="module")
def models(tiny_artifacts: Path) -> LoadedModels:
    return load_artifacts(tiny_artifacts)


def shapes(models: LoadedModels) -> tuple[torch.Size, torch.Size, torch.Size]:
    state = torch.Size([models.lm.config.num_layers, models.lm.config.hidden_size])
    return state, state, torch.Size([models.vocab.size])


def worker(models: LoadedModels, table: Path) -> Engine:
    """An engine as a gunicorn worker has it: its own cache, and the shared table at `table`."""
    shared = SharedStates(table, 1 << 20, shapes(models))
    return Engine(models, EngineOptions(batching=False), prefix_cache=PrefixCache(1 << 20, shared=shared))


def test_a_prompt_encoded_by_one_worker_is_found_by_another(models: LoadedModels, tmp_path: Path) -> None:
    table = tmp_path / "states"
    first, second = worker(models, table), worker(models, table)
    plain = Engine(models, EngineOptions(batching=False))
    expected = plain.next_token(PROMPT, 5)
    assert first.next_token(PROMPT, 5) == expected
    assert second.next_token(PROMPT, 5) == expected  # found in the shared table, not encoded again
    cache = second.prefix_cache
    assert cache is not None and cache.shared is not None
    assert cache.hits == 1 and cache.saved == len(PROMPT) + 1 and cache.shared.hits == 1
    again = second.next_token(PROMPT, 5)  # now in its own cache: the shared table is not asked again
    assert again == expected and cache.shared.hits == 1 and cache.hits == 2


def test_a_longer_prompt_starts_from_the_last_shared_checkpoint(models: LoadedModels, tmp_path: Path) -> None:
    """The shared level is asked for the whole prompt and its checkpoints, not for where other prompts
    ended (each worker's own cache indexes those), so a longer prompt resumes at its last checkpoint."""
    table = tmp_path / "states"
    first, second = worker(models, table), worker(models, table)
    plain = Engine(models, EngineOptions(batching=False))
    first.next_token(PROMPT, 5)
    longer = PROMPT + " ROMEO. Hark!"
    assert second.next_token(longer, 5) == plain.next_token(longer, 5)
    assert second.prefix_cache is not None and second.prefix_cache.saved == len(PROMPT) // CHECKPOINT * CHECKPOINT


def test_the_table_is_bounded_and_evicts_the_least_recently_used(models: LoadedModels, tmp_path: Path) -> None:
    layout = shapes(models)
    floats = sum(s.numel() for s in layout)
    table = SharedStates(tmp_path / "states", WAYS * (32 + 4 * floats), layout)  # one set of WAYS slots
    assert table.sets == 1 and os.path.getsize(tmp_path / "states") == table.nbytes
    keys = [PrefixKeys([i, i + 1, i + 2]) for i in range(WAYS + 1)]
    for number, key in enumerate(keys[:WAYS]):
        table.put(key.key(3), torch.full((floats,), float(number)))
    assert table.get(keys[0].key(3)) is not None  # used again: now the most recent
    table.put(keys[WAYS].key(3), torch.full((floats,), 99.0))
    assert table.entries() == WAYS
    assert table.get(keys[1].key(3)) is None  # the least recently used went
    found = table.get(keys[WAYS].key(3))
    assert found is not None and torch.equal(found, torch.full((floats,), 99.0))


def test_two_gunicorn_workers_share_their_prompts(tiny_artifacts: Path) -> None:
    """The same long prompt, each time on a new connection: after the first, every request is a cache hit,
    whichever worker takes it, and every answer is the same."""
    with gunicorn_server(tiny_artifacts, WORKERS="2") as base:
        port = int(base.rsplit(":", 1)[1])
        answers, shared_hits = set(), 0.0
        for _ in range(40):  # bounded: until the second worker has answered from the shared table
            status, body, _ = asyncio.run(exchange(port, "POST", "/v1/next-token", {"text": PROMPT}))
            assert status == 200
            answers.add(body)
            text = asyncio.run(exchange(port, "GET", "/metrics"))[1].decode()
            shared_hits = metric_total(text, "charlm_prefix_cache_shared_hits_total")
            if shared_hits:
                break
        assert shared_hits >= 1, "every request landed on one worker"
        assert len(answers) == 1
        assert metric_total(text, "charlm_prefix_cache_misses_total") == 1  # only the very first
