"""A per-worker LRU cache from prompt prefixes to the LSTM state after them. No Flask in here.

An LSTM's whole context is its state: 2 layers x (h, c) x 512 floats, 8 KiB for the served model.
So the state after a prompt is all that a later prompt extending it needs: it encodes only the
rest. Keys are hashes of the ids (normalized, start symbol first) of a prefix. Entries are made
at every `CHECKPOINT` ids inside a prompt, at its end, and where a generation stopped; so a shared
system prompt hits at its checkpoints, and a growing chat history (the previous prompt, its reply,
a new turn) hits where the previous request left off.

A lookup cannot try every prefix length of a prompt, so the cache remembers, for each checkpoint
(and the start), at which lengths after it entries end; a lookup tries those, the checkpoints and
the whole prompt, longest first.

An entry holds the state, the logits after its last id and, when scoring made it, the
log-probability of each of its ids after the start symbol (so /v1/score can report a cached
prefix's characters too). Entries are bounded in bytes and evicted least recently used first.
"""

from __future__ import annotations

import array
import collections
import hashlib
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from service.engine.observer import IGNORED, EngineObserver
from service.engine.shared_prefix_cache import SharedStates

CHECKPOINT = 256  # ids between cache keys inside a prompt
ENTRY_OVERHEAD = 256  # bytes an entry costs beyond its state and values: keys, dict slots, objects

Key = tuple[int, bytes]  # (ids in the prefix, BLAKE2b digest of those ids)


class PrefixKeys:
    """The cache keys of the prefixes of one id sequence, from one pass of BLAKE2b over its ids."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.length = len(ids)
        self._data = array.array("I", ids).tobytes()
        hasher = hashlib.blake2b(digest_size=16)
        self._at = {0: hasher.copy()}  # the hash state after each checkpoint
        for base in range(CHECKPOINT, self.length + 1, CHECKPOINT):
            hasher.update(self._data[4 * (base - CHECKPOINT) : 4 * base])
            self._at[base] = hasher.copy()
        self._keys: dict[int, Key] = {}

    @property
    def checkpoints(self) -> list[int]:
        """The prefix lengths that are multiples of CHECKPOINT, shortest first."""
        return [base for base in self._at if base]

    def key(self, length: int) -> Key:
        """The key of the first `length` ids."""
        if length not in self._keys:
            base = length // CHECKPOINT * CHECKPOINT
            hasher = self._at[base].copy()
            hasher.update(self._data[4 * base : 4 * length])
            self._keys[length] = (length, hasher.digest())
        return self._keys[length]

    def region(self, length: int) -> Key | None:
        """For a length between checkpoints, the key of the checkpoint before it (the start's for the
        first stretch); None at a checkpoint."""
        return None if length % CHECKPOINT == 0 else self.key(length // CHECKPOINT * CHECKPOINT)


@dataclass(kw_only=True, frozen=True)
class CachedState:
    """The state after the first `length` ids of a sequence."""

    length: int
    h: torch.Tensor  # (layers, H)
    c: torch.Tensor  # (layers, H)
    logits: torch.Tensor  # (V,): the distribution of the next id
    logprobs: array.array | None = None  # float64 log-probability of ids 1..length-1, each given those before it

    def flat(self) -> torch.Tensor:
        """h, c and the logits end to end, as a slot of a cache holds them."""
        return torch.cat([self.h.reshape(-1), self.c.reshape(-1), self.logits.reshape(-1)])

    @classmethod
    def from_flat(
        cls,
        length: int,
        floats: torch.Tensor,
        shapes: tuple[torch.Size, torch.Size, torch.Size],
        logprobs: array.array | None = None,
    ) -> CachedState:
        """The state in `floats` (as `flat` lays it out), viewed in the shapes of h, c and the logits."""
        h_shape, c_shape, logits_shape = shapes
        a, b = h_shape.numel(), h_shape.numel() + c_shape.numel()
        return cls(
            length=length,
            h=floats[:a].view(h_shape),
            c=floats[a:b].view(c_shape),
            logits=floats[b:].view(logits_shape),
            logprobs=logprobs,
        )

    @property
    def nbytes(self) -> int:
        tensors = sum(t.numel() * t.element_size() for t in (self.h, self.c, self.logits))
        values = 0 if self.logprobs is None else self.logprobs.itemsize * len(self.logprobs)
        return tensors + values + ENTRY_OVERHEAD


@dataclass(kw_only=True)
class _Held:
    """An entry as the cache keeps it: its state in a slot of the slab."""

    length: int
    slot: int
    logprobs: array.array | None
    region: Key | None
    nbytes: int


_CACHES: weakref.WeakSet[PrefixCache] = weakref.WeakSet()


def _fresh_locks_after_fork() -> None:
    for cache in list(_CACHES):
        cache._after_fork()


os.register_at_fork(after_in_child=_fresh_locks_after_fork)


class PrefixCache:
    """Thread-safe: the scheduler thread (generation, next-token) and request threads (score) share it.

    The states live in one preallocated slab, a slot per entry, copied in on `put` and out on `lookup`.
    As thousands of separate small tensors, evicted ones freed among the short-lived allocations of
    prompt encoding, they fragmented the heap, so that a worker grew far past the cache's bound (see
    docs/architecture.md). The slab is one allocation of at most `max_bytes`, whose pages are touched
    as slots fill.
    """

    def __init__(
        self,
        max_bytes: int,
        shared: SharedStates | None = None,
        observer: EngineObserver = IGNORED,
    ) -> None:
        """`shared` is the pod-wide second level: looked at for longer prefixes than this cache holds, and
        given every entry without log-probabilities that this cache stores. `observer` hears of every
        lookup, of the bytes held and of the shared level's hits."""
        self.max_bytes = max_bytes
        self.shared = shared
        self.observer = observer
        self._entries: OrderedDict[Key, _Held] = OrderedDict()  # least recently used first
        self._ends: dict[Key, collections.Counter[int]] = {}  # region -> lengths of the entries that end in it
        self._slab: torch.Tensor | None = None  # (slots, floats of h, c and logits), made at the first put
        self._shapes: tuple[torch.Size, torch.Size, torch.Size] | None = None
        self._free: list[int] = []
        self.bytes = 0
        self.hits = self.misses = self.saved = 0  # for tests and the benchmark
        self._lock = threading.Lock()
        # A gunicorn worker is forked from the master that built the engine: a fresh lock, never one
        # that another thread of the master might have held at the fork.
        _CACHES.add(self)  # weakly: an unloaded model version's cache can be freed

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, keys: PrefixKeys, scored: bool = False) -> CachedState | None:
        """A copy of the entry of the longest cached prefix of the sequence, now most recently used; None
        when there is none. With `scored`, only checkpoints with per-id log-probabilities count."""
        found = self._lookup_here(keys, scored)
        if self.shared is not None and not scored:
            found = self._lookup_shared(keys, self.shared, found) or found
        with self._lock:
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
                self.saved += found.length
        self.observer.cache_lookup(0 if found is None else found.length)
        return found

    def _lookup_shared(self, keys: PrefixKeys, shared: SharedStates, found: CachedState | None) -> CachedState | None:
        """The longest prefix the pod-wide level holds beyond `found` (the whole sequence, then its
        checkpoints), copied into this cache too; None when it has none longer."""
        longer = [n for n in (keys.length, *keys.checkpoints) if n > (0 if found is None else found.length)]
        for length in sorted(set(longer) - {1}, reverse=True):
            floats = shared.get(keys.key(length))
            if floats is not None:
                entry = CachedState.from_flat(length, floats, shared.shapes)
                self.put(keys, entry, share=False)
                self.observer.shared_hit()
                return entry
        return None

    def _lookup_here(self, keys: PrefixKeys, scored: bool) -> CachedState | None:
        found = None
        with self._lock, torch.inference_mode():
            lengths = set(keys.checkpoints)
            if not scored:
                lengths.add(keys.length)
                for base in [0, *keys.checkpoints]:
                    ends = self._ends.get(keys.key(base), ())
                    lengths.update(n for n in ends if n <= keys.length)
            lengths.discard(1)  # the start symbol alone: the same for every prompt, and one step
            for length in sorted(lengths, reverse=True):
                key = keys.key(length)
                held = self._entries.get(key)
                if held is not None and (held.logprobs is not None or not scored):
                    self._entries.move_to_end(key)
                    found = self._read(held)
                    break
        return found

    def _read(self, held: _Held) -> CachedState:
        assert self._slab is not None and self._shapes is not None
        return CachedState.from_flat(held.length, self._slab[held.slot].clone(), self._shapes, held.logprobs)

    def put(self, keys: PrefixKeys, entry: CachedState, share: bool = True) -> None:
        """Store (a copy of) the state after the first `entry.length` ids of `keys`' sequence. An entry
        already there stays, unless the new one adds log-probabilities. With `share`, an entry without
        log-probabilities goes to the pod-wide level too."""
        if share and self.shared is not None and entry.logprobs is None and entry.length >= 2:
            with torch.inference_mode():
                self.shared.put(keys.key(entry.length), entry.flat())
        size = entry.nbytes
        key, region = keys.key(entry.length), keys.region(entry.length)
        with self._lock, torch.inference_mode():
            if self._slab is None:
                self._shapes = (entry.h.shape, entry.c.shape, entry.logits.shape)
                floats = entry.h.numel() + entry.c.numel() + entry.logits.numel()
                slots = self.max_bytes // (4 * floats + ENTRY_OVERHEAD)
                self._slab = torch.empty(slots, floats)
                self._free = list(range(slots - 1, -1, -1))
            if (entry.h.shape, entry.c.shape, entry.logits.shape) != self._shapes:
                raise ValueError("every state in one cache has the same shapes")
            if size > self.max_bytes or not len(self._slab) or entry.length < 2:
                return
            held = self._entries.get(key)
            if held is not None and (held.logprobs is not None or entry.logprobs is None):
                self._entries.move_to_end(key)
                return
            if held is not None:
                self._remove(key)
            while self._entries and (self.bytes + size > self.max_bytes or not self._free):
                self._remove(next(iter(self._entries)))
            slot = self._free.pop()
            self._slab[slot].copy_(entry.flat())
            self._entries[key] = _Held(
                length=entry.length, slot=slot, logprobs=entry.logprobs, region=region, nbytes=size
            )
            self.bytes += size
            if region is not None:
                self._ends.setdefault(region, collections.Counter())[entry.length] += 1
            held_bytes = self.bytes
        self.observer.cache_size(held_bytes)

    def _remove(self, key: Key) -> None:
        held = self._entries.pop(key)
        self.bytes -= held.nbytes
        self._free.append(held.slot)
        if held.region is not None:
            ends = self._ends[held.region]
            ends[held.length] -= 1
            if ends[held.length] <= 0:
                del ends[held.length]
            if not ends:
                del self._ends[held.region]
