"""How a model's unpinned requests split over its loaded versions: weights, and the hash that keeps a client
on one version. No Flask in here.

A model's weights come from `traffic.json` in its folder of the repository,

    {"weights": {"3": 90, "4": 10}}

(which may also name a shadow candidate: service.models.shadow) or, for a model without weights in such a
file (the single-artifact case among them), from TRAFFIC_WEIGHTS, `{"char-lstm": {"1": 100}}`. A loaded
version the weights do not name gets weight 0: it answers requests pinned to it (NAME@VERSION) and
finishes the streams it has, and takes no new unpinned ones. Without weights, the newest loaded version
takes them all. The repository reads the file at each sync and swaps the weights in with the loaded
versions, so a change applies whole, at the next poll or SIGHUP; a file that does not parse keeps the
weights in force (logged).

Requests that carry a sticky key (their OpenAI `user`, else their API key) go to the version their key's
hash falls on: the same in every worker and replica, for as long as the weights stand. Others are spread
at random by weight.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from service.models.shadow import ShadowConfig

TRAFFIC_FILE = "traffic.json"
MAX_FILE_BYTES = 64 << 10


class TrafficError(ValueError):
    """Weights that cannot be used: the message says why."""


def parse_weights(raw: object, where: str) -> dict[int, float]:
    """`{"VERSION": weight, ...}` as versions and weights (TrafficError when it is anything else)."""
    if not isinstance(raw, dict) or not raw:
        raise TrafficError(f"{where}: weights must be an object of version: weight")
    weights = {}
    for key, value in raw.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) > 0):
            raise TrafficError(f"{where}: {key!r} is not a version (a positive integer)")
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1e6:
            raise TrafficError(f"{where}: the weight of version {key} must be a number from 0 to 1000000")
        weights[int(key)] = float(value)
    if not any(weights.values()):
        raise TrafficError(f"{where}: every weight is 0")
    return weights


@dataclass(frozen=True)
class TrafficPlan:
    """A model's traffic.json: its weights (None: the newest takes everything) and its shadow candidate."""

    weights: dict[int, float] | None
    shadow: ShadowConfig | None


def parse_shadow(raw: object, where: str) -> ShadowConfig:
    if not isinstance(raw, dict) or set(raw) != {"version", "percent"}:
        raise TrafficError(f'{where}: shadow must be {{"version": VERSION, "percent": 0 to 100}}')
    version, percent = raw["version"], raw["percent"]
    if isinstance(version, bool) or not isinstance(version, int) or version <= 0:
        raise TrafficError(f"{where}: shadow.version must be a positive integer")
    if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 <= percent <= 100:
        raise TrafficError(f"{where}: shadow.percent must be a number from 0 to 100")
    return ShadowConfig(version=version, percent=float(percent))


def read_traffic_file(model_dir: Path) -> TrafficPlan | None:
    """A model folder's traffic.json; None without one; TrafficError for one that is wrong."""
    path = model_dir / TRAFFIC_FILE
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TrafficError(f"{path}: {exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise TrafficError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise TrafficError(f"{path}: not JSON ({exc})") from None
    if not isinstance(document, dict) or not document or not set(document) <= {"weights", "shadow"}:
        raise TrafficError(f'{path}: expected {{"weights": {{"VERSION": weight, ...}}, "shadow": {{...}}}}')
    weights = parse_weights(document["weights"], str(path)) if "weights" in document else None
    shadow = parse_shadow(document["shadow"], str(path)) if "shadow" in document else None
    return TrafficPlan(weights=weights, shadow=shadow)


def settings_weights(text: str) -> dict[str, dict[int, float]]:
    """TRAFFIC_WEIGHTS, `{"MODEL": {"VERSION": weight}}` (empty: none); TrafficError when it is wrong."""
    if not text.strip():
        return {}
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise TrafficError(f"TRAFFIC_WEIGHTS: not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise TrafficError('TRAFFIC_WEIGHTS: expected {"MODEL": {"VERSION": weight, ...}}')
    return {str(name): parse_weights(weights, f"TRAFFIC_WEIGHTS[{name}]") for name, weights in document.items()}


def sticky_point(key: str) -> float:
    """Where a sticky key falls in [0, 1): the same in every process."""
    digest = hashlib.sha256(b"charlm-traffic\0" + key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick(weights: Mapping[int, float], sticky: str | None) -> int:
    """The version a request goes to, by weight: by its sticky key's hash, or at random without one."""
    versions = sorted(v for v, w in weights.items() if w > 0)
    total = sum(weights[v] for v in versions)
    point = (sticky_point(sticky) if sticky is not None else random.random()) * total
    for version in versions:
        point -= weights[version]
        if point < 0:
            return version
    return versions[-1]
