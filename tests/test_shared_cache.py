"""The pod-wide level of the prefix cache: a table in shared memory that every worker maps. Two engines in
one process stand for two workers; then a real gunicorn server with two workers, on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.loadgen import exchange
from benchmarks.servers import metric_total
from seqmodels.artifacts import LoadedModels, load_artifacts
from service.engine.engine import Engine, EngineOptions
from service.engine.prefix_cache import CHECKPOINT, PrefixCache, PrefixKeys
from service.engine.shared_prefix_cache import CREATE_LOCK, WAYS, SharedStates, detach_all
from service.server.owned_folders import OWNER_LOCK, owned_folder
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


# --------------------------------------------------------------------------- faults: space, torn writes, users


@contextmanager
def small_tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (as a container's small /dev/shm is); skipped where this process may not mount."""
    mount = tmp_path / "shm"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_table_reserves_its_pages_and_takes_only_what_the_filesystem_has(
    models: LoadedModels, tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path, "1m") as shm:
        first = SharedStates(shm / "0.states", 16 << 20, shapes(models))  # asks for 16 MiB of 1 MiB
        assert 0 < first.nbytes <= 1 << 19 and first.reserved_bytes == first.nbytes  # half the free space
        assert os.stat(shm / "0.states").st_blocks * 512 >= first.nbytes  # allocated now, not at a write
        tables = [first]
        while tables[-1].nbytes > 0:  # each version after takes half of what is left, until none fits
            assert len(tables) < 32
            tables.append(SharedStates(shm / f"{len(tables)}.states", 16 << 20, shapes(models)))
        off = tables[-1]
        assert not off.path.exists() and off.reserved_bytes == 0
        key = PrefixKeys([1, 2, 3]).key(3)
        off.put(key, torch.ones(off.floats))  # off: a no-op, never a SIGBUS
        assert off.get(key) is None
        for table in tables[:-1]:  # pages all over every table written
            for i in range(table.sets * WAYS):
                table.put(PrefixKeys([i, i + 1, i + 2]).key(3), torch.full((table.floats,), float(i)))
            assert table.entries() > table.sets * WAYS // 2
        for table in tables:
            table.close()
        assert [p.name for p in shm.iterdir()] == [CREATE_LOCK]  # the last users removed the tables


def test_a_worker_killed_mid_write_leaves_a_miss_not_another_prompts_state(
    models: LoadedModels, tmp_path: Path
) -> None:
    layout = shapes(models)
    floats = sum(s.numel() for s in layout)
    table = SharedStates(tmp_path / "states", WAYS * (32 + 4 * floats), layout)  # one set: a put replaces a slot
    old_keys = [PrefixKeys([i, i + 1, i + 2]).key(3) for i in range(WAYS)]
    for number, key in enumerate(old_keys):
        table.put(key, torch.full((floats,), float(number)))
    new_key = PrefixKeys([7, 7, 7]).key(3)
    child = os.fork()
    if child == 0:  # a worker killed by SIGKILL halfway through writing the floats of its store
        try:

            def half_then_die(shared: Any, offset: int, values: torch.Tensor) -> None:
                shared.floats_at(offset)[: floats // 2].copy_(values[: floats // 2])
                os.kill(os.getpid(), signal.SIGKILL)

            SharedStates._write = staticmethod(half_then_die)  # type: ignore[method-assign, assignment]
            SharedStates(tmp_path / "states", WAYS * (32 + 4 * floats), layout).put(
                new_key, torch.full((floats,), -1.0)
            )
        finally:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert table.get(new_key) is None  # never served
    for number, key in enumerate(old_keys):  # the slot it took now holds nothing: every other key is intact
        found = table.get(key)
        assert found is None or torch.equal(found, torch.full((floats,), float(number)))
    assert sum(table.get(key) is None for key in old_keys) == 1
    table.close()


def test_a_corrupted_slot_is_a_miss(models: LoadedModels, tmp_path: Path) -> None:
    table = SharedStates(tmp_path / "states", 1 << 20, shapes(models))
    key = PrefixKeys([1, 2, 3]).key(3)
    table.put(key, torch.ones(table.floats))
    with open(tmp_path / "states", "r+b") as raw:  # flip one float's bytes in place, its key left as it was
        data = raw.read()
        offset = data.index(key[1]) + 32
        raw.seek(offset)
        raw.write(b"\x00\x00\x80\x7f")
    assert table.get(key) is None and table.torn == 1
    table.put(key, torch.ones(table.floats))  # a torn entry is stored afresh, not taken for the same state
    assert table.get(key) is not None
    table.close()


def test_engines_of_one_process_share_one_table_and_the_last_user_removes_it(
    models: LoadedModels, tmp_path: Path
) -> None:
    path = tmp_path / "states"
    first, second = (SharedStates(path, 1 << 20, shapes(models)) for _ in range(2))
    assert first._table is second._table  # one descriptor, so one set of locks, per process and file
    key = PrefixKeys([1, 2, 3]).key(3)
    first.put(key, torch.ones(first.floats))
    first.close()  # a reload of identical files retires the old engine while the new one serves
    assert path.exists()
    found = second.get(key)
    assert found is not None and torch.equal(found, torch.ones(first.floats))
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    child = os.fork()
    if child == 0:  # another worker, using the table until told to stop
        ok = False
        try:
            ok = second.get(key) is not None  # its own descriptor, opened after the fork
            os.write(ready_w, b"x")
            os.read(go_r, 1)
            second.close()
        finally:
            os._exit(0 if ok else 1)
    assert os.read(ready_r, 1) == b"x"
    second.close()
    assert path.exists()  # the other worker still maps it: not unlinked under it
    os.write(go_w, b"x")
    _, status = os.waitpid(child, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert not path.exists()  # its last user removed it
    for fd in (ready_r, ready_w, go_r, go_w):
        os.close(fd)


def test_the_master_lets_go_of_its_tables_and_uses_them_again_on_demand(models: LoadedModels, tmp_path: Path) -> None:
    table = SharedStates(tmp_path / "states", 1 << 20, shapes(models))
    key = PrefixKeys([1, 2, 3]).key(3)
    table.put(key, torch.ones(table.floats))
    detach_all()
    assert table._table.map is None and (tmp_path / "states").exists()  # the file stays for the workers
    assert table.get(key) is not None  # mapped again by whoever uses it
    table.close()


def test_leftovers_of_dead_servers_are_removed_and_running_servers_kept(tmp_path: Path) -> None:
    dead = tmp_path / "charlm-states-dead"
    dead.mkdir()
    (dead / OWNER_LOCK).touch()
    (dead / "m@1.states").write_bytes(b"x" * 100)
    live = Path(owned_folder("charlm-states-", str(tmp_path)))  # held by this process, as by a running master
    again = Path(owned_folder("charlm-states-", str(tmp_path)))
    assert not dead.exists()
    assert live.exists() and again.exists() and live != again
