"""A loaded model version and what the repository keeps about versions: folder fingerprints, refusals,
NAME@VERSION, the SIGHUP counter the workers share, and handing an unloaded version's memory back."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.engine.engine import Engine
from service.models.sessions import SessionCodec

VERSION_SEPARATOR = "@"  # NAME@VERSION pins a version


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def give_back_freed_memory() -> bool:
    """Free an unloaded version's objects now and hand the pages they held back to the system.

    An engine and its scheduler refer to each other, so only the cycle collector frees them; and glibc
    keeps freed heap pages below the top of its arenas mapped, so without malloc_trim a worker's RSS would
    grow by part of a version at every rollout. Whether the pages could be handed back."""
    gc.collect()
    trim = _malloc_trim()
    return trim is not None and trim(0) == 1


Fingerprint = tuple[tuple[str, int, int], ...]  # (path, size, mtime) of every file in a version folder


class ModelNotFound(Exception):
    """A `model` that names no loaded model or version."""


class RepositoryError(Exception):
    """A repository that cannot serve at all (start-up): no loadable model, or an unknown DEFAULT_MODEL."""


def fingerprint(folder: Path) -> Fingerprint:
    """What changes when a folder's files are written, renamed in or removed: sizes and modification times."""
    entries = []
    for dirpath, _, filenames in os.walk(folder):
        for filename in filenames:
            path = Path(dirpath, filename)
            with contextlib.suppress(OSError):  # removed while we looked: the fingerprint changes anyway
                stat = path.stat()
                entries.append((path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


@dataclass(eq=False, kw_only=True)
class ModelVersion:
    """One loaded version: its engine, and the requests using it (`leases`)."""

    name: str
    version: int
    path: Path
    engine: Engine
    fingerprint: Fingerprint
    memory_bytes: int
    load_seconds: float
    sessions: SessionCodec | None = None  # signs and opens this version's session handles (ModelRuntime's)
    precision: dict[str, str] | None = None  # the weights' dtype and why it was chosen
    leases: int = 0
    retired: bool = False

    @property
    def id(self) -> str:
        return f"{self.name}{VERSION_SEPARATOR}{self.version}"

    @property
    def digest(self) -> str:
        return self.engine.models.digest


@dataclass(kw_only=True)
class Refusal:
    fingerprint: Fingerprint
    reason: str  # "unverified" (missing, truncated, tampered, another format) or "memory"
    message: str
    memory_in_use: int  # bytes loaded when it was refused: a memory refusal is retried below that


def parse_model(value: str) -> tuple[str, int | None]:
    """`NAME` or `NAME@VERSION` -> (name, version or None); ModelNotFound for anything else."""
    name, sep, version = value.partition(VERSION_SEPARATOR)
    if sep and not (version.isascii() and version.isdigit() and int(version) > 0):
        raise ModelNotFound(f"`{value}`: a version is a positive integer, as in `{name}{VERSION_SEPARATOR}2`")
    return name, int(version) if sep else None


class SighupCounter:
    """A counter in memory shared by the gunicorn master and its forked workers: the master's SIGHUP
    handler adds one, and each worker's watcher syncs when it sees a new value. Async-signal-safe: a
    store into shared memory, no lock."""

    def __init__(self) -> None:
        self._cell = mmap.mmap(-1, 8)  # anonymous and shared: forked workers see the master's writes

    @property
    def value(self) -> int:
        return int(struct.unpack_from("<Q", self._cell)[0])

    def bump(self) -> None:
        struct.pack_into("<Q", self._cell, 0, self.value + 1)
