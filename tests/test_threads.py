"""Torch's thread counts: the models load on one thread, and with TORCH_THREADS > 1 only the scheduler
thread runs operators on several (see `off_the_scheduler`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flask import Flask

from seqmodels.artifacts import load_artifacts
from service.api.app import create_app
from service.engine.engine import Engine, EngineOptions
from service.engine.lstm_kernels import off_the_scheduler
from service.engine.scheduler import Scheduler
from service.settings import Settings


@pytest.fixture
def two_torch_threads() -> Iterator[None]:
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def where_it_ran() -> tuple[int, int]:
    return threading.get_ident(), torch.get_num_threads()


def test_with_one_torch_thread_work_runs_where_it_is() -> None:
    assert off_the_scheduler(where_it_ran) == (threading.get_ident(), 1)


def test_with_more_it_runs_on_a_passing_thread_of_one(two_torch_threads: None) -> None:
    ident, threads = off_the_scheduler(where_it_ran)
    assert ident != threading.get_ident() and threads == 1
    assert torch.get_num_threads() == 2  # the caller's count, and so the scheduler's, is untouched
    spawned: list[int] = []
    later = threading.Thread(target=lambda: spawned.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert spawned == [2]  # a scheduler thread started afterwards gets TORCH_THREADS


def test_a_failure_on_the_passing_thread_reaches_the_caller(two_torch_threads: None) -> None:
    def fails() -> None:
        raise ValueError("from the passing thread")

    with pytest.raises(ValueError, match="from the passing thread"):
        off_the_scheduler(fails)


def test_models_load_on_one_thread_and_the_app_keeps_torch_threads(
    tiny_artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    build = Engine.__init__

    def recording(self: Engine, *args: object, **kwargs: object) -> None:
        seen.append(torch.get_num_threads())
        build(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Engine, "__init__", recording)
    try:
        app: Flask = create_app(Settings(artifacts_dir=tiny_artifacts, torch_threads=2))
        assert seen == [1]  # before a gunicorn master forks: no OpenMP threads for the workers to inherit
        assert torch.get_num_threads() == 2
        assert app.extensions["models"]
    finally:
        torch.set_num_threads(1)


def test_scoring_with_two_torch_threads_equals_one(app: Flask, two_torch_threads: None) -> None:
    client = app.test_client()
    body = {"texts": ["To be, or not to be, that is the question.", "Hark"], "include_tokens": True}
    with_two = client.post("/v1/score", json=body)
    torch.set_num_threads(1)
    with_one = client.post("/v1/score", json=body)
    assert with_two.status_code == with_one.status_code == 200
    assert with_two.get_json()["results"] == with_one.get_json()["results"]


@pytest.mark.parametrize("torch_threads", [1, 2])
def test_an_idle_scheduler_ends_its_thread_only_with_several_torch_threads(
    tiny_artifacts: Path, monkeypatch: pytest.MonkeyPatch, torch_threads: int
) -> None:
    monkeypatch.setattr(Scheduler, "IDLE_SECONDS", 0.05)
    torch.set_num_threads(torch_threads)
    try:
        engine = Engine(load_artifacts(tiny_artifacts), EngineOptions(batching=True))
        assert engine.scheduler is not None
        first = engine.next_token("Hark", 3)
        time.sleep(10 * Scheduler.IDLE_SECONDS)
        deadline = time.monotonic() + 10  # a loaded machine may be slow to let the thread end
        while torch_threads > 1 and engine.scheduler.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.scheduler.alive() == (torch_threads == 1)
        again = engine.next_token("Hark", 3)  # a new thread where the old one ended
        assert [c.token for c in again.candidates] == [c.token for c in first.candidates]
        assert engine.scheduler.alive()
        engine.close()
    finally:
        torch.set_num_threads(1)
