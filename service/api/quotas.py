"""API keys with limits: who may call, how often, how much they may generate, how many requests they may
have running, and which models they may use. No Flask here: the app (service.api.app) and the gRPC
servicer ask `KeyRing`.

Keys come from API_KEYS (no limits) and from API_KEYS_FILE, a JSON file (a mounted Kubernetes Secret,
say) read again whenever it changes, without a restart:

    {"keys": [{"key": "...", "name": "team-a", "requests_per_second": 20, "chars_per_minute": 60000,
               "concurrent": 8, "models": ["char-lstm"]}]}

Every limit is optional. `requests_per_second` and `chars_per_minute` are token buckets that hold one
second and one minute of their rate; a request takes one request token when it is admitted and the
characters it generated when it ends (a request is admitted while the character bucket is above 0).
`concurrent` counts requests running, streams until they close. `models` limits the models the key may
name (403 for the others).

The counts are the server's, not a worker's: each key's state is a small file in QUOTA_DIR, a folder
the workers share, updated under the file's lock, so two workers do not give a key twice its quota. A
worker's running requests are kept under its pid, and those of a worker that died are dropped. Keys never
leave this module in clear: logs and metrics name a key by `key_id`, a short hash.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.api.api_keys import bearer_key
from service.api.errors import ApiError
from service.metrics import QUOTA_REFUSED
from service.settings import Settings

log = logging.getLogger("service")

MAX_FILE_BYTES = 1 << 20
STATE = struct.Struct("<dddd")  # request tokens, their time, character tokens, their time
RUNNING = struct.Struct("<ii")  # a worker's pid and its running requests
MAX_WORKERS = 64


def quota_folder(settings: Settings) -> Path:
    """QUOTA_DIR, or where no server made one, a temporary folder of this process (removed at its exit)."""
    if settings.quota_dir is not None:
        return settings.quota_dir
    own = tempfile.TemporaryDirectory(prefix="charlm-quotas-")
    _own_folders.append(own)
    return Path(own.name)


_own_folders: list[tempfile.TemporaryDirectory[str]] = []


def key_id(key: str) -> str:
    """A key's name in logs and metrics: a short, stable hash, never the key."""
    return hashlib.sha256(b"charlm-key\0" + key.encode()).hexdigest()[:12]


class KeyFileError(ValueError):
    pass


@dataclass(frozen=True, kw_only=True)
class KeyPolicy:
    key: str = field(repr=False)
    name: str = ""
    requests_per_second: float | None = None
    chars_per_minute: float | None = None
    concurrent: int | None = None
    models: frozenset[str] | None = None

    @property
    def id(self) -> str:
        return key_id(self.key)

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.requests_per_second, self.chars_per_minute, self.concurrent))


def _number(entry: dict[str, Any], name: str, integer: bool = False) -> Any:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float) or value <= 0:
        raise KeyFileError(f"{name} must be a positive {'integer' if integer else 'number'}")
    return value


def parse_key_file(raw: bytes) -> list[KeyPolicy]:
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise KeyFileError(f"not JSON ({exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeyFileError('expected {"keys": [{"key": ..., ...}, ...]}')
    known = {"key", "name", "requests_per_second", "chars_per_minute", "concurrent", "models"}
    policies = []
    for i, entry in enumerate(document["keys"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or len(entry["key"]) < 8:
            raise KeyFileError(f"keys[{i}]: needs a key of at least 8 characters")
        unknown = set(entry) - known
        if unknown:
            raise KeyFileError(f"keys[{i}]: unknown field {sorted(unknown)[0]!r}")
        models = entry.get("models")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
            raise KeyFileError(f"keys[{i}]: models must be a list of model names")
        try:
            policies.append(KeyPolicy(
                key=entry["key"], name=str(entry.get("name", "")),
                requests_per_second=_number(entry, "requests_per_second"),
                chars_per_minute=_number(entry, "chars_per_minute"),
                concurrent=_number(entry, "concurrent", integer=True),
                models=None if models is None else frozenset(models),
            ))  # fmt: skip
        except KeyFileError as exc:
            raise KeyFileError(f"keys[{i}]: {exc}") from None
    return policies


@dataclass(kw_only=True)
class Quota:
    """A key's limits and what is left of them now, for the x-ratelimit-* headers."""

    policy: KeyPolicy
    requests_left: float = math.inf
    requests_reset: float = 0.0  # seconds until the request bucket is full again
    chars_left: float = math.inf
    chars_reset: float = 0.0
    retry_after: float | None = None  # set when the request is refused
    refused: str | None = None  # which limit refused it: "requests", "chars" or "concurrent"

    def error(self) -> ApiError:
        """The 429 of a refused request (`rate_limit_exceeded`, OpenAI's type: requests or tokens)."""
        what = {"requests": "requests per second", "chars": "generated characters per minute",
                "concurrent": "concurrent requests"}[self.refused or "requests"]  # fmt: skip
        return ApiError(429, f"rate limit reached for this API key: {what}; retry in {self.headers()['Retry-After']} s",
                        "tokens" if self.refused == "chars" else "requests", code="rate_limit_exceeded")  # fmt: skip

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        p = self.policy
        if p.requests_per_second is not None:
            out |= {"x-ratelimit-limit-requests": f"{p.requests_per_second:g}",
                    "x-ratelimit-remaining-requests": str(max(0, math.floor(self.requests_left))),
                    "x-ratelimit-reset-requests": f"{self.requests_reset:.3f}s"}  # fmt: skip
        if p.chars_per_minute is not None:
            out |= {"x-ratelimit-limit-tokens": f"{p.chars_per_minute:g}",
                    "x-ratelimit-remaining-tokens": str(max(0, math.floor(self.chars_left))),
                    "x-ratelimit-reset-tokens": f"{self.chars_reset:.3f}s"}  # fmt: skip
        if self.retry_after is not None:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return out


class QuotaCounters:
    """Each limited key's buckets and running requests, in a file of QUOTA_DIR shared by the workers."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._fds = {}
        self._lock = threading.Lock()

    def _fd(self, policy: KeyPolicy) -> int:
        with self._lock:
            fd = self._fds.get(policy.id)
            if fd is None:
                fd = self._fds[policy.id] = os.open(self.folder / f"{policy.id}.quota", os.O_RDWR | os.O_CREAT, 0o600)
            return fd

    def _update(self, policy: KeyPolicy, change: Any) -> Any:
        fd = self._fd(policy)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(fd, STATE.size + MAX_WORKERS * RUNNING.size, 0)
            now = time.time()
            if len(raw) >= STATE.size:
                state = list(STATE.unpack_from(raw))
            else:  # a key's first request: full buckets
                state = [policy.requests_per_second or 0.0, now, policy.chars_per_minute or 0.0, now]
            running = {}
            for offset in range(STATE.size, len(raw) - RUNNING.size + 1, RUNNING.size):
                pid, count = RUNNING.unpack_from(raw, offset)
                if count > 0 and _alive(pid):
                    running[pid] = count
            _refill(policy, state, now)
            result = change(state, running, now)
            entries = [RUNNING.pack(pid, count) for pid, count in list(running.items())[:MAX_WORKERS] if count > 0]
            data = STATE.pack(*state) + b"".join(entries)
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            return result
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def admit(self, policy: KeyPolicy) -> Quota:
        """Take a request token and a running slot, or refuse (Quota.refused) and take nothing."""
        pid = os.getpid()

        def change(state: list[float], running: dict[int, int], now: float) -> Quota:
            quota = _quota(policy, state)
            if policy.requests_per_second is not None and state[0] < 1:
                quota.refused, quota.retry_after = "requests", (1 - state[0]) / policy.requests_per_second
            elif policy.chars_per_minute is not None and state[2] <= 0:
                quota.refused, quota.retry_after = "chars", (1 - state[2]) / (policy.chars_per_minute / 60)
            elif policy.concurrent is not None and sum(running.values()) >= policy.concurrent:
                quota.refused, quota.retry_after = "concurrent", 1.0
            if quota.refused is None:
                if policy.requests_per_second is not None:
                    state[0] -= 1
                running[pid] = running.get(pid, 0) + 1
                quota = _quota(policy, state)
            return quota

        result: Quota = self._update(policy, change)
        return result

    def finish(self, policy: KeyPolicy, generated_chars: int) -> None:
        """A request admitted by `admit` ended, having generated `generated_chars` characters."""
        pid = os.getpid()

        def change(state: list[float], running: dict[int, int], now: float) -> None:
            if policy.chars_per_minute is not None:
                state[2] -= generated_chars
            running[pid] = max(0, running.get(pid, 0) - 1)

        self._update(policy, change)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refill(policy: KeyPolicy, state: list[float], now: float) -> None:
    if policy.requests_per_second is not None:
        rate = policy.requests_per_second
        state[0] = min(rate, state[0] + (now - state[1]) * rate)
    state[1] = now
    if policy.chars_per_minute is not None:
        capacity = policy.chars_per_minute
        state[2] = min(capacity, state[2] + (now - state[3]) * capacity / 60)
    state[3] = now


def _quota(policy: KeyPolicy, state: list[float]) -> Quota:
    quota = Quota(policy=policy)
    if policy.requests_per_second is not None:
        rate = policy.requests_per_second
        quota.requests_left, quota.requests_reset = state[0], max(0.0, rate - state[0]) / rate
    if policy.chars_per_minute is not None:
        capacity = policy.chars_per_minute
        quota.chars_left, quota.chars_reset = state[2], max(0.0, capacity - state[2]) / (capacity / 60)
    return quota


class KeyRing:
    """The keys the server accepts (API_KEYS and API_KEYS_FILE) and their limits."""

    RELOAD_SECONDS = 1.0  # the file is looked at no more often than this

    def __init__(self, env_keys: list[str], key_file: Path | None, counters: QuotaCounters) -> None:
        self._env = [KeyPolicy(key=k) for k in env_keys]
        self.key_file = key_file
        self.counters = counters
        self._file_policies: list[KeyPolicy] = []
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if key_file is not None:
            self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        assert self.key_file is not None
        now = time.monotonic()
        if not force and now - self._checked < self.RELOAD_SECONDS:
            return
        self._checked = now
        try:
            info = os.stat(self.key_file)
            stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
            if stamp == self._stamp:
                return
            with open(self.key_file, "rb") as handle:
                raw = handle.read(MAX_FILE_BYTES + 1)
            if len(raw) > MAX_FILE_BYTES:
                raise KeyFileError(f"larger than {MAX_FILE_BYTES} bytes")
            policies = parse_key_file(raw)
        except (OSError, KeyFileError) as exc:
            if force and self._stamp is None:
                log.error("API_KEYS_FILE %s: %s; its keys are refused until it is fixed", self.key_file, exc)
            else:
                log.error("API_KEYS_FILE %s: %s; the keys read before stay", self.key_file, exc)
            return
        self._file_policies, self._stamp = policies, stamp
        log.info("API_KEYS_FILE %s: %d keys", self.key_file, len(policies))

    def policies(self) -> list[KeyPolicy]:
        if self.key_file is not None:
            with self._lock:
                self._reload()
        return [*self._env, *self._file_policies]

    def enabled(self) -> bool:
        return bool(self._env) or self.key_file is not None

    def admit(self, policy: KeyPolicy) -> Quota:
        """A request of a key with limits, admitted or refused (`Quota.refused`, counted in metrics)."""
        quota = self.counters.admit(policy)
        if quota.refused is not None:
            QUOTA_REFUSED.labels(key=policy.id, limit=quota.refused).inc()
        return quota

    def authorize(self, authorization: str) -> KeyPolicy | None:
        """The policy of the key an `Authorization` value presents; None for no key or an unknown one."""
        policies = self.policies()
        key = bearer_key([p.key for p in policies], authorization)
        if key is None:
            return None
        return next(p for p in policies if p.key == key)
