"""The quality gate: a new version takes unpinned traffic only if it is not clearly worse than the version
taking it now. No Flask in here.

The two are compared on a probe text: `probe.txt` in the new version's folder, else in the serving
version's. Both score it (bits per character, the same code as /v1/score); the new version is refused
when its figure is higher by more than QUALITY_GATE_BITS. Without a probe the gate compares the held-out
bits per character in the two manifests (`metrics.lm.test_bpc`, measured on the split their training
used), and lets the version through where either lacks one. A refusal is logged with both figures, listed
in /v1/models, counted (`charlm_model_versions_refused_total{reason="quality"}`) and looked at again when
the version's files change, as any refusal is.
"""

from __future__ import annotations

import logging
from pathlib import Path

from service.models.versions import ModelVersion
from service.settings import Settings

log = logging.getLogger("service.models.repository")

PROBE_FILE = "probe.txt"
MAX_PROBE_CHARS = 20_000  # a probe's first characters: enough for a figure, bounded in time


def read_probe(folder: Path) -> str | None:
    try:
        text = (folder / PROBE_FILE).read_text(encoding="utf-8", errors="replace")[:MAX_PROBE_CHARS]
    except OSError:
        return None
    return text if text else None


def probe_bits(mv: ModelVersion, probe: str) -> float:
    (score,) = mv.engine.score([probe], include_tokens=False)
    return float(score.bits_per_char)


def held_out_bits(mv: ModelVersion) -> float | None:
    value = mv.engine.models.manifest.get("metrics", {}).get("lm", {}).get("test_bpc")
    return float(value) if isinstance(value, int | float) else None


class QualityGate:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.quality_gate
        self.margin = settings.quality_gate_bits

    def judge(self, candidate: ModelVersion, serving: ModelVersion) -> str | None:
        """Why `candidate` may not take `serving`'s traffic, with both figures; None when it may."""
        if not self.enabled:
            return None
        probe = read_probe(candidate.path) or read_probe(serving.path)
        if probe is not None:
            ours, theirs, what = probe_bits(candidate, probe), probe_bits(serving, probe), "the probe text"
        else:
            held_ours, held_theirs = held_out_bits(candidate), held_out_bits(serving)
            if held_ours is None or held_theirs is None:
                log.info("quality gate: no probe text and no held-out figure to compare %s with %s",
                         candidate.id, serving.id)  # fmt: skip
                return None
            ours, theirs, what = held_ours, held_theirs, "held-out text (manifest test_bpc)"
        log.info("quality gate: %s %.4f, %s %.4f bits per character on %s", candidate.id, ours, serving.id, theirs,
                 what)  # fmt: skip
        if ours > theirs + self.margin:
            return (f"worse than {serving.id} on {what}: {ours:.4f} against {theirs:.4f} bits per character, "
                    f"more than QUALITY_GATE_BITS={self.margin:g} over")  # fmt: skip
        return None
