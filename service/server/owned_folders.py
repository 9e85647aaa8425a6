"""Folders a server owns while it runs (the workers' metrics, the shared prefix tables), and the removal of
those left by servers that are gone: a killed master's folder in a /dev/shm that outlived it."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_LOCK = "owner.lock"  # in a server's folder: flock'ed by its master (and so its workers) while it runs


def owned_folder(prefix: str, base: str | None) -> str:
    """A fresh folder `prefix*` under `base` (None: the system's temporary folder) that this process owns
    while it runs: it holds an flock on the folder's OWNER_LOCK, inherited by the processes it forks.
    Folders of `prefix` whose owner is gone (a server that was killed, in a /dev/shm that outlived it)
    are removed first."""
    parent = Path(base or tempfile.gettempdir())
    remove_leftovers(prefix, parent)
    making = Path(tempfile.mkdtemp(prefix="." + prefix, dir=parent))
    fd = os.open(making / (OWNER_LOCK + ".new"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held for the life of the server (kept open on purpose, never closed)
    os.rename(making / (OWNER_LOCK + ".new"), making / OWNER_LOCK)  # a sweep sees it only once it is held
    folder = parent / making.name[1:]
    os.rename(making, folder)
    return str(folder)


def remove_leftovers(prefix: str, parent: Path) -> list[Path]:
    """Remove the folders `prefix*` in `parent` (and `.prefix*`, a start that was killed before its folder
    was named) whose OWNER_LOCK no running server holds; returns them. A folder without one is left alone:
    it was not made by `owned_folder`."""
    removed: list[Path] = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.lstrip(".").startswith(prefix) and p.is_dir()]
    except OSError:
        return removed
    for folder in candidates:
        try:
            fd = os.open(folder / OWNER_LOCK, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its server runs
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    for folder in removed:
        log.info("removed %s, left by a server that is no longer running", folder)
    return removed
