"""Rollouts on a real gunicorn server under load (the benchmark's own traffic and checks, shortened): new
versions found by polling and by SIGHUP to the master serve in every worker, with no failed request, no
non-2xx answer and no stream cut short or moved to another version; a corrupt version never serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.rollout import run


@pytest.mark.parametrize("sighup", [False, True], ids=["polling", "sighup"])
def test_rollouts_under_load_lose_nothing(tiny_artifacts: Path, sighup: bool) -> None:
    report = run(tiny_artifacts, seconds=1.0, versions=2, poll=0.5, sighup=sighup)
    for part in ("quiet", "rollout"):
        figures = report[part]
        assert (figures["failed"], figures["non_2xx"], figures["streams_cut"]) == (0, 0, 0), figures
        assert figures["streams_mixing_versions"] == 0 and figures["streams_complete"] > 0, figures
    events = report["rollout_events"]
    assert events["corrupt_never_served"] and events["corrupt_refusals"] >= 2 and events["workers_unchanged"], events
    assert report["rollout"]["answered_by"].keys() >= {"shakespeare@2", "shakespeare@3"}
