"""The pod-wide level of the prefix cache: states after prompt prefixes, in memory that every worker
process of a server maps, so that a prompt one worker encoded is found by the others. No Flask in here.

A worker's own `PrefixCache` is the first level: fast, and private. This is the second, looked at when
the first has nothing as long: a file on tmpfs (a folder that gunicorn.conf.py makes per server start,
in /dev/shm where it can), mapped shared by every worker that loads the same model version, so a repeated
prompt is a hit whichever worker a fresh connection lands on.

It is a set-associative table of fixed-size slots, like a CPU cache: a key's set is chosen by its hash,
and a set's `WAYS` slots are searched; a new entry replaces the set's least recently used slot. Each slot
holds the key (the prefix's length and BLAKE2b digest), a last-use stamp (CLOCK_MONOTONIC, the same
clock in every process) and the state: h, c and the logits after the prefix, float32. Entries carry no
per-character log-probabilities, so /v1/score's cached prefixes stay in the first level.

A set is locked for each lookup or store: a byte-range lock (fcntl) keeps other processes out, and a
thread lock the other threads of this one (byte-range locks are per process). The table's size is fixed
when it is made, so the memory it takes is bounded: SHARED_PREFIX_CACHE_MB per model version.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import threading
import time
import weakref
from pathlib import Path

import torch

WAYS = 8  # slots per set
META = struct.Struct("<16sIIQ")  # digest, prefix length, 1 when the slot holds an entry, last-use stamp
Key = tuple[int, bytes]  # (ids in the prefix, BLAKE2b digest of those ids), as PrefixKeys makes them

_TABLES: weakref.WeakSet[SharedStates] = weakref.WeakSet()


def _fresh_locks_after_fork() -> None:
    for table in list(_TABLES):
        table._lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_locks_after_fork)


class SharedStates:
    def __init__(self, path: Path, max_bytes: int, shapes: tuple[torch.Size, torch.Size, torch.Size]) -> None:
        """Map (making it if no worker has yet) the table at `path`: at most `max_bytes`, each entry a
        state of `shapes` (h, c, logits) in float32. Every process opening one path passes the same."""
        self.path = path
        self.shapes = shapes
        floats = sum(shape.numel() for shape in shapes)
        self.floats = floats
        self.slot_bytes = META.size + 4 * floats
        self.sets = max(1, max_bytes // (self.slot_bytes * WAYS))
        self.nbytes = self.sets * WAYS * self.slot_bytes
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < self.nbytes:
            os.ftruncate(self._fd, self.nbytes)  # zero-filled: every slot empty
        self._map = mmap.mmap(self._fd, self.nbytes)
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._lock = threading.Lock()
        self.hits = self.misses = 0  # for tests and the benchmark
        _TABLES.add(self)

    def _set_of(self, key: Key) -> int:
        return int.from_bytes(key[1][:8], "little") % self.sets

    def _locked(self, index: int) -> _SetLock:
        return _SetLock(self, index * WAYS * self.slot_bytes, WAYS * self.slot_bytes)

    def _slots(self, index: int) -> range:
        start = index * WAYS * self.slot_bytes
        return range(start, start + WAYS * self.slot_bytes, self.slot_bytes)

    def get(self, key: Key) -> torch.Tensor | None:
        """A copy of the entry's floats, or None."""
        length, digest = key
        index = self._set_of(key)
        with self._locked(index):
            for offset in self._slots(index):
                held_digest, held_length, valid, _ = META.unpack_from(self._map, offset)
                if valid and held_length == length and held_digest == digest:
                    data = self._bytes[offset + META.size : offset + self.slot_bytes].view(torch.float32).clone()
                    META.pack_into(self._map, offset, digest, length, 1, time.monotonic_ns())
                    self.hits += 1
                    return data
        self.misses += 1
        return None

    def put(self, key: Key, floats: torch.Tensor) -> None:
        """Store the entry (float32, `floats` values), replacing the set's least recently used one."""
        length, digest = key
        index = self._set_of(key)
        with self._locked(index):
            victim, oldest = None, None
            for offset in self._slots(index):
                held_digest, held_length, valid, stamp = META.unpack_from(self._map, offset)
                if valid and held_length == length and held_digest == digest:
                    return  # a worker stored it first: the same state
                if not valid:
                    victim, oldest = offset, -1
                    break
                if oldest is None or stamp < oldest:
                    victim, oldest = offset, stamp
            assert victim is not None
            slot = self._bytes[victim + META.size : victim + self.slot_bytes].view(torch.float32)
            slot.copy_(floats.reshape(-1))
            META.pack_into(self._map, victim, digest, length, 1, time.monotonic_ns())

    def unlink(self) -> None:
        """Remove the table's file; processes that map it keep their mapping, a later one makes a new table."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def entries(self) -> int:
        """Slots holding an entry (a scan of the table, for tests and metrics)."""
        return sum(
            META.unpack_from(self._map, offset)[2] for index in range(self.sets) for offset in self._slots(index)
        )


class _SetLock:
    """One set of the table, held against the other threads of this process and against other processes."""

    def __init__(self, table: SharedStates, start: int, length: int) -> None:
        self.table, self.start, self.length = table, start, length

    def __enter__(self) -> None:
        self.table._lock.acquire()
        try:
            fcntl.lockf(self.table._fd, fcntl.LOCK_EX, self.length, self.start)
        except BaseException:
            self.table._lock.release()
            raise

    def __exit__(self, *_: object) -> None:
        try:
            fcntl.lockf(self.table._fd, fcntl.LOCK_UN, self.length, self.start)
        finally:
            self.table._lock.release()
