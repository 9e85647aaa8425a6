"""Characters generated on the current thread: a request's thread reads them when the request ends (its
API key's quota of characters, service.api.quotas). Each thread counts its own; no Flask here."""

from __future__ import annotations

import threading

_local = threading.local()


def reset() -> None:
    _local.generated = 0


def add(characters: int) -> None:
    _local.generated = getattr(_local, "generated", 0) + characters


def generated() -> int:
    return int(getattr(_local, "generated", 0))
