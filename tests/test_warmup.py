"""Warmup: before a version serves, synthetic requests at the configured batch sizes run through it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.engine.engine import Engine
from service.settings import Settings
from tests.test_repository import make_app, publish, repo_of

pytestmark = pytest.mark.unit


def test_warm_up_runs_every_path_and_leaves_answers_unchanged(tiny_artifacts: Path) -> None:
    engine = Engine.from_dir(tiny_artifacts)
    try:
        before = engine.next_token_logits("ROMEO: But soft").tolist()
        assert engine.warm_up([1, 4], prompt_chars=20) > 0
        assert engine.next_token_logits("ROMEO: But soft").tolist() == pytest.approx(before, abs=1e-5)
    finally:
        engine.close()


def test_versions_warm_up_before_they_serve_unless_turned_off(
    tmp_path: Path, tiny_artifacts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert Settings(warmup_batch_sizes="1,8,32").warmup_sizes() == [1, 8, 32]
    assert Settings(warmup_batch_sizes="").warmup_sizes() == []
    root = tmp_path / "models"
    publish(tiny_artifacts, root, "bard", 1)
    for sizes, warmed in (("1,2", True), ("", False)):
        with caplog.at_level(logging.INFO, logger="service.models.repository"):
            caplog.clear()
            app = make_app(root, warmup_batch_sizes=sizes)
        try:
            assert any("warmed up model bard@1" in r.getMessage() for r in caplog.records) == warmed
            assert repo_of(app).serving("bard") is not None
        finally:
            for mv in repo_of(app).versions():
                mv.engine.close()
