"""Sequences of requests that share LSTM state, as Triton's sequence batcher keeps them: the Open Inference
Protocol's `sequence_id`, `sequence_start` and `sequence_end`. No Flask in here.

Unlike a session handle, which the client carries, a sequence lives on the server, under its id: one file
per sequence in a folder that every worker of the server shares (SEQUENCE_DIR), so that a sequence's
requests may land on any worker. A file holds the version that started the sequence, when it was last
used, the LSTM state and the logits of the next character (about 8 KiB for the served model), under a
CRC. Its requests run one at a time, in the order they take the file's lock. A sequence is scoped to the
principal (API key) that started it: another key does not find it. Replicas do not share the folder: a
sequence's requests go to one replica, as Triton's go to one server.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from service.engine.types import SequenceState

MAGIC = b"CSQ1"
HEADER = struct.Struct("<4sIdIHHI")  # magic, version number, last used (Unix seconds), CRC, layers, hidden, vocab
SUFFIX = ".seq"


class SequenceError(Exception):
    """A sequence request that cannot go on: `code` is "sequence_not_started" (no such sequence, it ended,
    or it was idle too long), "too_many_sequences" or "sequence_version" (its version is no longer loaded)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(kw_only=True)
class SequenceSlot:
    """A sequence during one request: the version that started it and its state (None at its start)."""

    version: int | None
    state: SequenceState | None
    end: bool
    _fd: int

    def save(self, version: int, state: SequenceState) -> None:
        """Write the state the request leaves (unless it ends the sequence)."""
        self.version = version
        if self.end:
            return
        floats = torch.cat([state.h.reshape(-1), state.c.reshape(-1), state.logits.reshape(-1)]).float()
        body = bytearray(floats.numel() * 4)
        torch.frombuffer(body, dtype=torch.float32).copy_(floats)
        layers, hidden = state.h.shape
        header = HEADER.pack(MAGIC, version, time.time(), zlib.crc32(body), layers, hidden, state.logits.numel())
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, header + bytes(body), 0)


class SequenceStore:
    def __init__(self, folder: Path, idle_seconds: float, max_sequences: int) -> None:
        self.folder = folder
        self.idle_seconds = idle_seconds
        self.max_sequences = max_sequences
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, principal: bytes, model: str, sequence_id: int | str) -> Path:
        kind = "i" if isinstance(sequence_id, int) else "s"
        key = hashlib.sha256(b"\0".join([principal, model.encode(), f"{kind}{sequence_id}".encode()]))
        return self.folder / (key.hexdigest()[:40] + SUFFIX)

    @contextmanager
    def step(
        self, principal: bytes, model: str, sequence_id: int | str, start: bool, end: bool
    ) -> Iterator[SequenceSlot]:
        """One request of sequence `sequence_id` of `model`, holding the sequence's lock: a fresh state with
        `start`, else the stored one (SequenceError when there is none). With `end`, the sequence is gone
        after the request; a request that fails leaves it as it was."""
        path = self._path(principal, model, sequence_id)
        if start:
            self._make_room(path)
        fd = self._open_locked(path, start, sequence_id)
        try:
            slot = SequenceSlot(version=None, state=None, end=end, _fd=fd)
            if not start:
                slot.version, slot.state = self._read(fd, sequence_id)
            yield slot
            if end:
                os.ftruncate(fd, 0)  # a request waiting on the lock finds it ended
                _unlink(path)
        finally:
            os.close(fd)

    def _open_locked(self, path: Path, create: bool, sequence_id: int | str) -> int:
        """The sequence's file, open and locked: the one at `path` once the lock is held (a request that
        ended the sequence while this one waited has unlinked the file it waited on)."""
        while True:
            try:
                fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
            except FileNotFoundError:
                raise self._not_started(sequence_id) from None
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
            if not create:
                raise self._not_started(sequence_id)

    def _read(self, fd: int, sequence_id: int | str) -> tuple[int, SequenceState]:
        raw = os.pread(fd, 1 << 24, 0)
        if len(raw) < HEADER.size:
            raise self._not_started(sequence_id)
        magic, version, used, crc, layers, hidden, vocab = HEADER.unpack_from(raw)
        body = raw[HEADER.size :]
        if magic != MAGIC or len(body) != 4 * (2 * layers * hidden + vocab) or zlib.crc32(body) != crc:
            raise self._not_started(sequence_id)  # written by another format, or torn by a worker killed mid-write
        if time.time() - used > self.idle_seconds:
            raise SequenceError("sequence_not_started", f"sequence {sequence_id} was idle too long and is gone; "
                                "start it again with sequence_start")  # fmt: skip
        floats = torch.frombuffer(bytearray(body), dtype=torch.float32)
        n = layers * hidden
        state = SequenceState(
            h=floats[:n].reshape(layers, hidden), c=floats[n : 2 * n].reshape(layers, hidden), logits=floats[2 * n :]
        )
        return version, state

    def _make_room(self, path: Path) -> None:
        """Before a new sequence: past MAX_SEQUENCES, forget those idle too long; still past it, refuse."""
        if path.exists():
            return  # a restart of a sequence takes no more room
        names = list(self.folder.glob("*" + SUFFIX))
        if len(names) < self.max_sequences:
            return
        cutoff = time.time() - self.idle_seconds
        for name in names:
            try:
                if name.stat().st_mtime < cutoff:
                    _unlink(name)
            except FileNotFoundError:
                continue
        if len(list(self.folder.glob("*" + SUFFIX))) >= self.max_sequences:
            raise SequenceError(
                "too_many_sequences", f"{self.max_sequences} sequences are open; end one (sequence_end) or retry later"
            )

    def open_count(self) -> int:
        return len(list(self.folder.glob("*" + SUFFIX)))

    @staticmethod
    def _not_started(sequence_id: int | str) -> SequenceError:
        return SequenceError(
            "sequence_not_started",
            f"sequence {sequence_id} has not started: its first request needs sequence_start",
        )


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
