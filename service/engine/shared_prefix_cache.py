"""The pod-wide level of the prefix cache: states after prompt prefixes, in memory that every worker
process of a server maps, so that a prompt one worker encoded is found by the others. No Flask in here.

A worker's own `PrefixCache` is the first level: fast, and private. This is the second, looked at when
the first has nothing as long: a file on tmpfs (a folder that gunicorn.conf.py makes per server start,
in /dev/shm where it can), mapped shared by every worker that loads the same model version, so a repeated
prompt is a hit whichever worker a fresh connection lands on.

It is a set-associative table of fixed-size slots, like a CPU cache: a key's set is chosen by its hash,
and a set's `WAYS` slots are searched; a new entry replaces the set's least recently used slot. Each slot
holds the key (the prefix's length and BLAKE2b digest), a last-use stamp (CLOCK_MONOTONIC, the same
clock in every process), a CRC-32 of the state, and the state: h, c and the logits after the prefix,
float32. Entries carry no per-character log-probabilities, so /v1/score's cached prefixes stay in the first
level.

Faults it is built to survive:
- A small tmpfs. The file's pages are reserved when the table is made (posix_fallocate) and the table takes
  at most what the filesystem has free; where even one set does not fit, the level is off. A mapping of
  unreserved tmpfs pages would SIGBUS the worker at the first write to a page that cannot be had.
- A worker killed mid-write. A store marks its slot empty before it writes the floats and stores the CRC
  with the key after them, and a lookup checks the CRC: a torn slot is a miss, never another prompt's state.
- Several users of one file. Locks are open-file-description locks (F_OFD_SETLK), so they exclude other
  processes and other descriptors alike; a process opens each file once, whichever engines use it
  (`_OPEN`), and threads take turns by a thread lock. Every process holding a table holds a read lock on
  a byte past its end; whoever closes it last (its write lock on that byte is granted) removes the file,
  so no table another worker uses is unlinked, and the pages go back to the system with the last user.
- A fork. A forked worker opens the tables again (its own descriptor and locks); the gunicorn master
  drops its own once the workers are about to start (`detach_all`), so it keeps no table alive.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("service.engine.shared_prefix_cache")

WAYS = 8  # slots per set
META = struct.Struct("<16sIIQ")  # digest, prefix length (0: the slot is empty), CRC-32 of the floats, last-use stamp
Key = tuple[int, bytes]  # (ids in the prefix, BLAKE2b digest of those ids), as PrefixKeys makes them
USERS_BYTE = 1 << 62  # every process holding a table read-locks this byte (past any table's end)
FLOCK = struct.Struct("hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
TABLE_SUFFIX = ".states"  # a table's file name ends so (service.models.runtime names them)
SCRATCH_SUFFIX = ".new"  # a table being made
CREATE_LOCK = ".create.lock"  # flock'ed by the process making a table in the folder


def _ofd_lock(fd: int, kind: int, start: int, length: int, wait: bool = True) -> bool:
    """Take (or, with F_UNLCK, drop) an open-file-description lock; False where `wait` is off and another
    description holds a conflicting one."""
    try:
        fcntl.fcntl(
            fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, FLOCK.pack(kind, os.SEEK_SET, start, length, 0)
        )
    except OSError as exc:
        if not wait and exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def reservable_bytes(folder: Path) -> int:
    """What the filesystem under `folder` has free for an unprivileged writer."""
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


class _Table:
    """One process's open table: its descriptor, mapping and thread lock, shared by every engine of the
    process that uses the file. `lock` guards the mapping itself too: a table is only mapped, unmapped or
    read under it, so no thread can touch a mapping that another is closing."""

    def __init__(self, path: Path, slot_bytes: int, requested_bytes: int) -> None:
        self.path, self.slot_bytes, self.requested_bytes = path, slot_bytes, requested_bytes
        self.users = 0  # SharedStates of this process using it
        self.lock = threading.Lock()
        self.fd = -1
        self.map: Any = None  # the mmap.mmap while mapped (Any: struct's pack_into takes it as a buffer)
        self.bytes = torch.empty(0, dtype=torch.uint8)
        self.sets = 0
        self.nbytes = 0  # 0 while not mapped in this process
        self.off = False  # no room for it when it was made: the level stays off for this table's life
        with self.lock:
            self._open()

    # ------------------------------------------------------------------ opening, sizing, closing

    def _open(self) -> None:
        """Map the file (making it if nobody has); the level is off where no table fits. Under `lock`."""
        try:
            self._open_or_create()
        except OSError as exc:  # the folder gone, a link refused: this version serves without the level
            log.error("shared prefix cache %s is off: %s", self.path.name, exc)
            self.off = True

    def _open_or_create(self) -> None:
        for _ in range(5):  # the file may be removed between our open and our lock by its last user
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                fd = self._create()
                if fd < 0:
                    self.off = True
                    return
            _ofd_lock(fd, fcntl.F_RDLCK, USERS_BYTE, 1)  # a user now (a creator's write lock becomes this)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.sets = os.fstat(fd).st_size // (WAYS * self.slot_bytes)
            if self.sets == 0:
                os.close(fd)
                self.off = True
                return
            self.fd = fd
            self.nbytes = self.sets * WAYS * self.slot_bytes
            self.map = mmap.mmap(fd, self.nbytes)
            self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)
            return
        raise OSError(errno.EAGAIN, "the table was removed each time it was opened")

    def _create(self) -> int:
        """A new table file of reserved pages, put in place whole, or the one another process made first;
        -1 where not even one set fits. One process of the server creates at a time (an flock on the
        folder's CREATE_LOCK), and a table takes at most half of what is free, so that the version rolled
        out next finds room too."""
        set_bytes = WAYS * self.slot_bytes
        wanted = self.requested_bytes // set_bytes * set_bytes
        guard = os.open(self.path.parent / CREATE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                return os.open(self.path, os.O_RDWR)  # made by another worker while we waited
            size = min(wanted, reservable_bytes(self.path.parent) // 2 // set_bytes * set_bytes)
            if size < set_bytes:
                log.warning(
                    "shared prefix cache %s: %s has room for no table of %d bytes; the shared level is off "
                    "for this version",
                    self.path.name,
                    self.path.parent,
                    set_bytes,
                )
                return -1
            if size < wanted:
                log.warning(
                    "shared prefix cache %s: %.1f MiB reserved of the %.1f MiB asked for (half the "
                    "filesystem's free space); raise the size of %s",
                    self.path.name,
                    size / 2**20,
                    wanted / 2**20,
                    self.path.parent,
                )
            return self._reserve(size)
        finally:
            os.close(guard)  # the flock goes with it

    def _reserve(self, size: int) -> int:
        """The table's file, `size` bytes reserved, written as a scratch file and linked into place whole.
        The scratch is write-locked while it is made, so a sweep knows a dead creator's from a live one's."""
        fd, scratch = tempfile.mkstemp(prefix=self.path.name + ".", suffix=SCRATCH_SUFFIX, dir=self.path.parent)
        try:
            _ofd_lock(fd, fcntl.F_WRLCK, USERS_BYTE, 1)
            os.posix_fallocate(fd, 0, size)  # reserved now: no page can fail to appear at a write
            os.link(scratch, self.path)
            return fd
        except BaseException:
            os.close(fd)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(scratch)

    def _unmap(self) -> None:
        """Drop this process's mapping and descriptor (the file stays). Under `lock`: no view of the
        mapping outlives a locked section, so none is left when it goes."""
        self.bytes = torch.empty(0, dtype=torch.uint8)
        if self.map is not None:
            self.map.close()
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)  # our locks go with the description
            self.fd = -1
        self.nbytes = self.sets = 0

    def detach(self) -> None:
        with self.lock:
            self._unmap()

    def ensure_mapped(self) -> None:
        """Map it again after `detach` (the gunicorn master's tables, used again after all)."""
        with self.lock:
            if self.map is None and not self.off:
                self._open()

    def close(self) -> None:
        """Unmap; and remove the file when no other process holds it (its last user removes it)."""
        with self.lock:
            self._unmap()
        remove_unused(self.path.parent, self.path)

    def after_fork(self) -> None:
        """In a forked child: the inherited descriptor shares the parent's locks, so open a new one."""
        self.lock = threading.Lock()
        with self.lock:
            self._unmap()  # the parent's description, and its locks, live on in the parent
            if self.users > 0 and not self.off:
                self._open()

    # ------------------------------------------------------------------ slots

    def set_of(self, key: Key) -> int:
        return int.from_bytes(key[1][:8], "little") % self.sets

    def slots(self, index: int) -> range:
        start = index * WAYS * self.slot_bytes
        return range(start, start + WAYS * self.slot_bytes, self.slot_bytes)

    def floats_at(self, offset: int) -> torch.Tensor:
        return self.bytes[offset + META.size : offset + self.slot_bytes].view(torch.float32)

    def crc_at(self, offset: int) -> int:
        with memoryview(self.map) as view:
            return zlib.crc32(view[offset + META.size : offset + self.slot_bytes])

    @contextlib.contextmanager
    def locked_set(self, key: Key) -> Iterator[int | None]:
        """The key's set, held against this process's other threads and every other descriptor; None where
        the table is not mapped (off, or closed meanwhile)."""
        with self.lock:
            if self.map is None:
                yield None
                return
            index = self.set_of(key)
            start, length = index * WAYS * self.slot_bytes, WAYS * self.slot_bytes
            _ofd_lock(self.fd, fcntl.F_WRLCK, start, length)
            try:
                yield index
            finally:
                _ofd_lock(self.fd, fcntl.F_UNLCK, start, length)


def remove_unused(folder: Path, *also: Path) -> list[Path]:
    """Remove the tables and scratch files in `folder` that no process holds: each user read-locks a table
    (and its creator write-locks a scratch file), so one whose write lock is granted to a fresh descriptor
    has none, whether its last user closed it (two closing at once each see the other's lock) or was
    killed."""
    removed: list[Path] = []
    try:
        names = {p for p in folder.iterdir() if p.name.endswith((TABLE_SUFFIX, SCRATCH_SUFFIX))} | set(also)
    except OSError:
        return removed
    for path in names:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            if _ofd_lock(fd, fcntl.F_WRLCK, USERS_BYTE, 1, wait=False) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
                removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


_OPEN: dict[Path, _Table] = {}  # this process's open tables, one per file
_OPEN_LOCK = threading.Lock()


def _reopen_after_fork() -> None:
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()
    for table in list(_OPEN.values()):
        table.after_fork()


os.register_at_fork(after_in_child=_reopen_after_fork)


def detach_all() -> None:
    """Drop every table this process maps (the gunicorn master, before it forks its workers): the files
    stay for the workers, and no page is kept alive by a process that never uses them."""
    with _OPEN_LOCK:
        for table in _OPEN.values():
            table.detach()


class SharedStates:
    """One engine's handle on a table; engines of one process that name the same file share its `_Table`."""

    def __init__(self, path: Path, max_bytes: int, shapes: tuple[torch.Size, torch.Size, torch.Size]) -> None:
        """Map (making it if no worker has yet) the table at `path`: at most `max_bytes`, and no more than half
        what the filesystem has free, each entry a state of `shapes` (h, c, logits) in float32. Every process
        opening one path passes the same shapes."""
        self.path = path
        self.shapes = shapes
        self.floats = sum(shape.numel() for shape in shapes)
        self.slot_bytes = META.size + 4 * self.floats
        self.hits = self.misses = self.torn = 0  # for tests, the benchmark and the log
        self.closed = False
        with _OPEN_LOCK:
            table = _OPEN.get(path)
            if table is None:
                table = _OPEN[path] = _Table(path, self.slot_bytes, max_bytes)
            table.users += 1
        self._table = table
        self.reserved_bytes = table.nbytes  # what the table holds: the memory it counts against

    @property
    def sets(self) -> int:
        return self._table.sets

    @property
    def nbytes(self) -> int:
        return self._table.nbytes

    def _usable(self) -> _Table | None:
        table = self._table
        if self.closed or table.off:
            return None
        if table.map is None:  # detached (the master's): map it again
            table.ensure_mapped()
        return table

    def get(self, key: Key) -> torch.Tensor | None:
        """A copy of the entry's floats, or None."""
        table = self._usable()
        if table is None:
            return None
        length, digest = key
        with table.locked_set(key) as index:
            for offset in table.slots(index) if index is not None else ():
                held_digest, held_length, crc, _ = META.unpack_from(table.map, offset)
                if held_length == length and held_digest == digest:
                    if table.crc_at(offset) != crc:  # torn by a writer that died mid-store
                        META.pack_into(table.map, offset, b"", 0, 0, 0)
                        self.torn += 1
                        break
                    data = table.floats_at(offset).clone()
                    META.pack_into(table.map, offset, digest, length, crc, time.monotonic_ns())
                    self.hits += 1
                    return data
        self.misses += 1
        return None

    def put(self, key: Key, floats: torch.Tensor) -> None:
        """Store the entry (float32, `floats` values), replacing the set's least recently used one."""
        table = self._usable()
        if table is None:
            return
        length, digest = key
        with table.locked_set(key) as index:
            if index is None:
                return
            victim, oldest = None, None
            for offset in table.slots(index):
                held_digest, held_length, crc, stamp = META.unpack_from(table.map, offset)
                if held_length == length and held_digest == digest:
                    if table.crc_at(offset) == crc:
                        return  # a worker stored it first: the same state
                    victim = offset  # torn: store it afresh
                    break
                if held_length == 0:
                    victim, oldest = offset, -1
                    break
                if oldest is None or stamp < oldest:
                    victim, oldest = offset, stamp
            assert victim is not None
            values = floats.reshape(-1).to(torch.float32).contiguous()
            META.pack_into(table.map, victim, b"", 0, 0, 0)  # empty while its floats are written
            self._write(table, victim, values)
            META.pack_into(table.map, victim, digest, length, table.crc_at(victim), time.monotonic_ns())

    @staticmethod
    def _write(table: _Table, offset: int, values: torch.Tensor) -> None:
        table.floats_at(offset).copy_(values)

    def close(self) -> None:
        """This engine is done with the table (its version unloaded); the process's last user unmaps it,
        and the server's last user removes the file."""
        if self.closed:
            return
        self.closed = True
        with _OPEN_LOCK:
            table = self._table
            table.users -= 1
            if table.users > 0:
                return
            if _OPEN.get(self.path) is table:
                del _OPEN[self.path]
        table.close()

    def entries(self) -> int:
        """Slots holding an entry (a scan of the table, for tests and metrics)."""
        table = self._usable()
        if table is None:
            return 0
        with table.lock:
            if table.map is None:
                return 0
            return sum(
                META.unpack_from(table.map, offset)[1] > 0
                for index in range(table.sets)
                for offset in table.slots(index)
            )
