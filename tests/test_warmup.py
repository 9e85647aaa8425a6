"""Warmup: before a version serves, synthetic requests at the configured batch sizes run through it."""

from __future__ import annotations

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
    tmp_path: Path, tiny_artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings(warmup_batch_sizes="1,8,32").warmup_sizes() == [1, 8, 32]
    assert Settings().warmup_sizes() == []
    calls: list[list[int]] = []
    original = Engine.warm_up

    def recording(engine: Engine, sizes: list[int], prompt_chars: int) -> float:
        calls.append(list(sizes))
        return original(engine, sizes, prompt_chars)

    monkeypatch.setattr(Engine, "warm_up", recording)
    root = tmp_path / "models"
    publish(tiny_artifacts, root, "bard", 1)
    for sizes, expected in (("1,2", [[1, 2]]), ("", [])):
        calls.clear()
        app = make_app(root, warmup_batch_sizes=sizes)
        try:
            assert calls == expected
            assert repo_of(app).serving("bard") is not None
        finally:
            for mv in repo_of(app).versions():
                mv.engine.close()
