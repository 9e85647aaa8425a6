"""The model repository: several models and versions in one app, chosen per request, rolled out, refused
when broken, and unloaded when gone. Through the real app and its test client; syncs are called directly
(the gunicorn workers' watcher and SIGHUP are in test_rollout.py)."""

from __future__ import annotations

import gc
import json
import logging
import re
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

import service.api.app
import service.models.repository
import service.models.versions
from benchmarks.servers import metric_total
from seqmodels import artifacts
from seqmodels.artifacts import LM_DIR, MANIFEST, WEIGHTS_FILE, ArtifactError
from service.api.app import create_app
from service.models.repository import ModelRepository
from service.models.versions import RepositoryError
from service.settings import Settings
from training.publish import main as train_publish

pytestmark = pytest.mark.unit  # no server: `pytest -m unit` runs these in about a minute

CYRILLIC = re.compile(r"[\u0400-\u04ff]")
LATIN = re.compile(r"[A-Za-z]")


def publish(source: Path, repository: Path, name: str, version: int) -> Path:
    """The safe way to add a version (copied beside, renamed in), as `python -m training.publish` does."""
    assert train_publish([str(source), "--repository", str(repository), "--name", name]) == 0
    return repository / name / str(version)


@pytest.fixture()
def repository(tmp_path: Path, tiny_artifacts: Path, cyrillic_artifacts: Path) -> Path:
    root = tmp_path / "models"
    publish(tiny_artifacts, root, "shakespeare", 1)
    publish(tiny_artifacts, root, "shakespeare", 2)
    publish(cyrillic_artifacts, root, "cyrillic", 1)
    return root


def make_app(repository: Path, **overrides: Any) -> Flask:
    settings = Settings(model_repository=repository, max_texts=4, max_text_chars=300, max_tokens=50, **overrides)
    app = create_app(settings)
    app.config.update(TESTING=True)
    return app


@pytest.fixture()
def app(repository: Path) -> Iterator[Flask]:
    app = make_app(repository, default_model="shakespeare")
    yield app
    for mv in repo_of(app).versions():
        mv.engine.close()


def repo_of(app: Flask) -> ModelRepository:
    repository: ModelRepository = app.extensions["models"].repository
    return repository


def post(client: FlaskClient, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = client.post(path, json=body)
    return response.status_code, response.get_json()


def events(response: Any) -> list[Any]:
    lines = response.get_data(as_text=True).split("\n\n")
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


# --------------------------------------------------------------------------- choosing a model


def test_models_lists_every_model_and_loaded_version(app: Flask) -> None:
    cards = app.test_client().get("/v1/models").get_json()["data"]
    assert [c["id"] for c in cards] == ["cyrillic", "cyrillic@1", "shakespeare", "shakespeare@2", "shakespeare@1"]
    by_id = {c["id"]: c for c in cards}
    assert by_id["shakespeare"]["versions"] == [2, 1] and by_id["shakespeare"]["version"] == 2
    assert [by_id[i]["serving"] for i in ("shakespeare@2", "shakespeare@1")] == [True, False]
    assert [by_id[i]["default"] for i in ("shakespeare", "shakespeare@2", "shakespeare@1", "cyrillic")] == [
        True,
        True,
        False,
        False,
    ]
    assert by_id["cyrillic"]["classifier"] is None and by_id["shakespeare"]["classifier"]["labels"]
    assert by_id["cyrillic"]["lm"]["metrics"]["test_bpc"] > 0
    assert all(c["memory_bytes"] > 0 and len(c["manifest_sha256"]) == 64 for c in cards)


def test_model_selects_the_network_on_every_endpoint(app: Flask) -> None:
    client = app.test_client()
    greedy = {"max_tokens": 30, "seed": 1}  # sampled: a tiny model's greedy text may be all spaces
    for model, script, other in (
        ("cyrillic", CYRILLIC, LATIN),
        ("shakespeare", LATIN, CYRILLIC),
        (None, LATIN, CYRILLIC),
    ):
        chosen = {} if model is None else {"model": model}
        status, body = post(client, "/v1/generate", {**chosen, "prompt": "", **greedy})
        assert status == 200, body
        text = body["choices"][0]["text"]
        assert script.search(text) and not other.search(text), (model, text)
        assert body["model"] == {"cyrillic": "cyrillic@1"}.get(model or "", "shakespeare@2")
        status, body = post(client, "/v1/next-token", {**chosen, "text": "", "top_k": 3})
        assert status == 200 and all(script.search(c["token"]) or not c["token"].isalpha() for c in body["candidates"])
    completion = post(client, "/v1/completions", {"model": "cyrillic", "prompt": "Утром", **greedy})[1]
    assert completion["model"] == "cyrillic@1" and CYRILLIC.search(completion["choices"][0]["text"])
    scores = {
        model: post(client, "/v1/score", {"model": model, "texts": ["Утром над рекой"]})[1]["results"][0][
            "bits_per_char"
        ]
        for model in ("cyrillic", "shakespeare")
    }
    assert scores["cyrillic"] < scores["shakespeare"]  # each model knows its own script
    status, body = post(client, "/v1/classify", {"model": "shakespeare@1", "texts": ["Good morrow"]})
    assert status == 200 and body["model"] == "shakespeare@1"
    status, body = post(client, "/v1/classify", {"model": "cyrillic", "texts": ["Утром"]})
    assert status == 400 and body["error"]["code"] == "no_classifier" and body["error"]["param"] == "model"


@pytest.mark.parametrize("model", ["nobody", "shakespeare@3", "shakespeare@0", "shakespeare@v2", "cyrillic@"])
@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/next-token", {"text": "a"}),
        ("/v1/generate", {"prompt": "a", "max_tokens": 2}),
        ("/v1/generate", {"prompt": "a", "max_tokens": 2, "stream": True}),
        ("/v1/score", {"texts": ["a"]}),
        ("/v1/classify", {"texts": ["a"]}),
        ("/v1/completions", {"prompt": "a", "max_tokens": 2}),
    ],
)
def test_unknown_models_and_versions_are_404(app: Flask, model: str, path: str, body: dict[str, Any]) -> None:
    status, answer = post(app.test_client(), path, {**body, "model": model})
    assert status == 404 and answer["error"]["code"] == "model_not_found" and answer["error"]["param"] == "model"


def test_pinned_version_answers_and_versions_keep_their_own_caches(app: Flask) -> None:
    client = app.test_client()
    same = {"prompt": "KING", "max_tokens": 20, "seed": 4}
    two = post(client, "/v1/generate", {**same, "model": "shakespeare@2"})[1]
    one = post(client, "/v1/generate", {**same, "model": "shakespeare@1"})[1]
    assert (two["model"], one["model"]) == ("shakespeare@2", "shakespeare@1")
    assert two["choices"] == one["choices"]  # the same weights copied twice: the same text
    versions = repo_of(app).versions("shakespeare")
    assert versions[0].engine.prefix_cache is not versions[1].engine.prefix_cache


def test_sessions_stay_with_the_version_that_made_them(app: Flask) -> None:
    client = app.test_client()
    body = {"prompt": "ROMEO", "max_tokens": 5, "return_session": True, "seed": 1}
    handle = post(client, "/v1/generate", {**body, "model": "shakespeare@1"})[1]["choices"][0]["session"]
    resumed = {"prompt": "", "max_tokens": 5, "session": handle}
    status, answer = post(client, "/v1/generate", {**resumed, "model": "shakespeare@2"})
    assert status == 404 and answer["error"]["code"] == "session_not_found"  # pinned to another version
    status, answer = post(client, "/v1/generate", {**resumed, "model": "cyrillic"})
    assert status == 404 and answer["error"]["code"] == "session_not_found"  # another model
    status, answer = post(client, "/v1/generate", {**resumed, "model": "shakespeare"})
    assert status == 200 and answer["model"] == "shakespeare@1"  # the model's name: its maker continues it


def test_default_model_is_the_only_one_or_the_first_by_name(repository: Path) -> None:
    app = make_app(repository)
    assert post(app.test_client(), "/v1/next-token", {"text": ""})[1]["model"] == "cyrillic@1"
    with pytest.raises(RepositoryError, match="DEFAULT_MODEL 'nobody' is not among the loaded models"):
        make_app(repository, default_model="nobody")
    with pytest.raises(RepositoryError, match="no model could be loaded"):
        make_app(repository / "empty")


# --------------------------------------------------------------------------- rollout


def test_a_new_version_serves_once_loaded_and_streams_finish_on_theirs(
    app: Flask, repository: Path, tiny_artifacts: Path
) -> None:
    client = app.test_client()
    repo = repo_of(app)
    stream = client.post("/v1/generate", json={"prompt": "a", "max_tokens": 40, "stream": True, "seed": 2})
    old = repo.serving("shakespeare")
    assert old is not None and old.leases == 1  # the stream holds version 2
    publish(tiny_artifacts, repository, "shakespeare", 3)
    changes = repo.sync()
    assert "model shakespeare: version 3 serves" in changes
    assert "model shakespeare@1 retired (newer versions replaced it); unloaded" in changes  # MODEL_VERSIONS=2
    assert post(client, "/v1/next-token", {"text": "a"})[1]["model"] == "shakespeare@3"
    shutil.rmtree(repository / "shakespeare" / "2")  # removed while its stream still runs
    assert "model shakespeare@2 retired (its folder is gone); unloaded when its 1 running requests end" in repo.sync()
    assert old.retired and old.leases == 1
    chunks = events(stream)
    stream.close()
    assert {c["model"] for c in chunks} == {"shakespeare@2"} and chunks[-1]["usage"]["completion_tokens"] == 40
    assert old.leases == 0
    assert [mv.id for mv in repo.versions("shakespeare")] == ["shakespeare@3", "shakespeare@1"]  # the newest 2


def test_a_corrupt_version_is_refused_once_and_the_old_one_serves(
    app: Flask, repository: Path, tiny_artifacts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = app.test_client()
    repo = repo_of(app)
    broken = publish(tiny_artifacts, repository, "shakespeare", 3)
    weights = broken / LM_DIR / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    before = metric_total(client.get("/metrics").get_data(as_text=True), "charlm_model_versions_refused_total")
    with caplog.at_level(logging.ERROR, logger="service.models.repository"):
        assert repo.sync() == []
        assert repo.sync() == []  # unchanged files: not looked at again
    refusals = [r.getMessage() for r in caplog.records if r.name == "service.models.repository"]
    assert len(refusals) == 1 and "shakespeare@3" in refusals[0] and "SHA-256 mismatch" in refusals[0]
    assert "shakespeare@2 goes on serving" in refusals[0]
    after = metric_total(client.get("/metrics").get_data(as_text=True), "charlm_model_versions_refused_total")
    assert after == before + 1
    assert post(client, "/v1/next-token", {"text": "a"})[1]["model"] == "shakespeare@2"
    assert client.get("/readyz").status_code == 200
    shutil.copyfile(tiny_artifacts / LM_DIR / WEIGHTS_FILE, weights)  # repaired: its files changed
    assert "model shakespeare: version 3 serves" in repo.sync()


def test_a_folder_still_being_copied_is_loaded_once_complete(
    app: Flask, repository: Path, tiny_artifacts: Path
) -> None:
    repo = repo_of(app)
    target = repository / "shakespeare" / "3"  # copied straight in, the manifest last: the unsafe way
    for path in sorted(tiny_artifacts.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            (target / path.relative_to(tiny_artifacts)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / path.relative_to(tiny_artifacts))
    assert repo.sync() == [] and repo.serving("shakespeare").version == 2  # type: ignore[union-attr]
    shutil.copyfile(tiny_artifacts / MANIFEST, target / MANIFEST)
    assert "model shakespeare: version 3 serves" in repo.sync()


def test_the_memory_budget_refuses_a_version_that_would_not_fit(repository: Path) -> None:
    probe = make_app(repository)
    sizes = {mv.id: mv.memory_bytes for mv in repo_of(probe).versions()}
    for mv in repo_of(probe).versions():
        mv.engine.close()
    room = sizes["cyrillic@1"] + sizes["shakespeare@2"] + sizes["shakespeare@1"] // 2
    app = make_app(repository, model_memory_mb=room / 2**20)
    repo = repo_of(app)
    assert [mv.id for mv in repo.versions()] == ["cyrillic@1", "shakespeare@2"]
    (refusal,) = repo.refusals().values()
    assert refusal.reason == "memory" and "over MODEL_MEMORY_MB" in refusal.message
    cards = app.test_client().get("/v1/models").get_json()["data"]
    assert sum(c["memory_bytes"] for c in cards if "@" in c["id"]) <= room


def test_with_one_version_a_rollout_never_leaves_the_model_without_one(repository: Path, tiny_artifacts: Path) -> None:
    app = make_app(repository, model_versions=1)
    repo = repo_of(app)
    seen_while_loading = []
    build = repo.build_engine

    def build_and_look(models: Any, model_id: str) -> Any:
        seen_while_loading.append(repo.resolve("shakespeare").id)  # a request arriving mid-load
        return build(models, model_id)

    repo.build_engine = build_and_look
    publish(tiny_artifacts, repository, "shakespeare", 3)
    assert "model shakespeare: version 3 serves" in repo.sync()
    assert seen_while_loading == ["shakespeare@2"]
    assert [mv.id for mv in repo.versions("shakespeare")] == ["shakespeare@3"]


def test_a_loaded_version_overwritten_with_bad_files_keeps_serving(app: Flask, repository: Path) -> None:
    repo = repo_of(app)
    weights = repository / "shakespeare" / "2" / LM_DIR / WEIGHTS_FILE
    weights.write_bytes(b"not weights")
    assert repo.sync() == []
    assert repo.serving("shakespeare").id == "shakespeare@2"  # type: ignore[union-attr]
    assert post(app.test_client(), "/v1/next-token", {"text": "a"})[0] == 200


def test_unloaded_versions_are_freed(app: Flask, repository: Path) -> None:
    repo = repo_of(app)
    engine = weakref.ref(repo.serving("cyrillic").engine)  # type: ignore[union-attr]
    shutil.rmtree(repository / "cyrillic")
    assert "model cyrillic@1 retired (its folder is gone); unloaded" in repo.sync()
    gc.collect()
    assert engine() is None  # nothing (fork hooks, schedulers, caches) keeps the weights alive


def test_an_unloaded_version_goes_back_to_the_system(
    app: Flask, repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sync that unloads a version collects it (engine and scheduler refer to each other) and trims
    the C heap, without the caller collecting; a version drained by its last request, at the watcher's
    next tick. glibc keeps freed pages below its arenas' tops otherwise: RSS grew at every rollout."""
    trims: list[int] = []
    monkeypatch.setattr(service.models.versions, "_malloc_trim", lambda: trims.append)
    repo = repo_of(app)
    engine = weakref.ref(repo.serving("cyrillic").engine)  # type: ignore[union-attr]
    shutil.rmtree(repository / "cyrillic")
    assert "model cyrillic@1 retired (its folder is gone); unloaded" in repo.sync()
    assert engine() is None and trims == [0]

    held = repo.acquire("shakespeare@2")
    drained = weakref.ref(held.engine)
    shutil.rmtree(repository / "shakespeare" / "2")
    assert "model shakespeare@2 retired (its folder is gone); unloaded when its 1 running requests end" in repo.sync()
    assert trims == [0]  # nothing unloaded by that sync
    repo.release(held)
    del held
    repo.give_back_unloaded()  # what the watcher does every tick
    assert drained() is None and trims == [0, 0]


def test_the_c_heap_can_be_trimmed_here() -> None:
    assert service.models.versions.give_back_freed_memory()  # glibc, as in the image


def test_a_version_refused_for_memory_loads_once_memory_frees_up(repository: Path) -> None:
    probe = make_app(repository)
    sizes = {mv.id: mv.memory_bytes for mv in repo_of(probe).versions()}
    room = sizes["cyrillic@1"] + sizes["shakespeare@2"] + sizes["shakespeare@1"] // 2
    app = make_app(repository, model_memory_mb=room / 2**20, default_model="shakespeare")
    repo = repo_of(app)
    assert [mv.id for mv in repo.versions()] == ["cyrillic@1", "shakespeare@2"]  # loaded by name, then newest first
    assert repo.sync() == []  # nothing freed: not tried again
    shutil.rmtree(repository / "cyrillic")
    changes = repo.sync()
    assert "model cyrillic@1 retired (its folder is gone); unloaded" in changes
    assert [mv.id for mv in repo.versions()] == ["shakespeare@2", "shakespeare@1"]


def test_a_repository_version_is_never_replaced(
    tiny_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = publish(tiny_artifacts, tmp_path, "m", 1)
    monkeypatch.setattr(artifacts, "next_version_dir", lambda repository, name: first)  # another writer's
    with pytest.raises(ArtifactError, match="already exists"):
        artifacts.publish_version(tiny_artifacts, tmp_path, "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]  # nothing replaced, nothing left behind


# --------------------------------------------------------------------------- faults in syncing


def test_a_memory_refusal_blocked_by_a_running_request_is_retried_once_it_ends(repository: Path) -> None:
    probe = make_app(repository)
    sizes = {mv.id: mv.memory_bytes for mv in repo_of(probe).versions()}
    for mv in repo_of(probe).versions():
        mv.engine.close()
    room = sizes["cyrillic@1"] + sizes["shakespeare@2"] * 3 // 2  # one shakespeare version at a time
    app = make_app(repository, model_memory_mb=room / 2**20, model_versions=1, default_model="shakespeare")
    repo = repo_of(app)
    held = repo.acquire("shakespeare")  # a stream on version 2 while version 3 arrives
    publish(repository / "shakespeare" / "2", repository, "shakespeare", 3)
    assert repo.sync() == []  # version 2 is still in use: 3 would not fit beside it
    assert repo.refusals()[str(repository / "shakespeare" / "3")].reason == "memory"
    assert repo.sync() == []  # nothing freed: not tried again
    repo.release(held)
    assert "model shakespeare: version 3 serves" in repo.sync()  # the lease that blocked it has ended
    assert [mv.id for mv in repo.versions("shakespeare")] == ["shakespeare@3"]


def test_an_unreadable_repository_keeps_what_is_loaded(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = repo_of(app)
    before = [mv.id for mv in repo.versions()]

    def stale(self: Path) -> Any:
        raise OSError(116, "Stale file handle")

    monkeypatch.setattr(Path, "iterdir", stale)
    assert repo.sync() == []
    repo.start_watching()  # a worker booting now starts with what is loaded instead of failing
    assert [mv.id for mv in repo.versions()] == before
    assert post(app.test_client(), "/v1/next-token", {"text": "a"})[0] == 200


def test_workers_poll_at_the_same_moments(repository: Path) -> None:
    repo = repo_of(make_app(repository, repository_poll_seconds=5))
    assert repo.next_poll_after(1_000_001.2) == repo.next_poll_after(1_000_004.9) == 1_000_005.0
    assert repo.next_poll_after(1_000_005.0) == 1_000_010.0


def test_a_session_of_a_version_this_worker_has_not_loaded_yet_is_found(repository: Path, tiny_artifacts: Path) -> None:
    """Two workers; one has loaded version 3 and made a session on it, the other has not looked yet: the
    other looks at the repository before it answers 404."""
    first = make_app(repository, default_model="shakespeare", session_secret="s")
    second = make_app(repository, default_model="shakespeare", session_secret="s")
    publish(tiny_artifacts, repository, "shakespeare", 3)
    repo_of(first).sync()
    status, body = post(
        first.test_client(),
        "/v1/generate",
        {"model": "shakespeare", "prompt": "a", "max_tokens": 3, "seed": 1, "return_session": True},
    )
    assert status == 200 and body["model"] == "shakespeare@3"
    handle = body["choices"][0]["session"]
    status, body = post(
        second.test_client(),
        "/v1/generate",
        {"model": "shakespeare", "prompt": "b", "max_tokens": 3, "seed": 1, "session": handle},
    )
    assert status == 200 and body["model"] == "shakespeare@3"


def test_an_unloaded_versions_series_leave_the_metrics(app: Flask, repository: Path) -> None:
    client = app.test_client()
    assert post(client, "/v1/next-token", {"model": "cyrillic", "text": "a"})[0] == 200
    assert 'model="cyrillic@1"' in client.get("/metrics").get_data(as_text=True)
    shutil.rmtree(repository / "cyrillic")
    repo_of(app).sync()
    assert 'model="cyrillic@1"' not in client.get("/metrics").get_data(as_text=True)


def test_a_failing_after_request_hook_does_not_leak_a_streams_lease(
    repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(response: Any) -> Any:
        raise RuntimeError("injected")

    monkeypatch.setattr(service.api.app, "_drain_request_body", fails)  # one of the app's own hooks fails
    app = make_app(repository)
    app.config.update(TESTING=False, PROPAGATE_EXCEPTIONS=False)
    response = app.test_client().post("/v1/generate", json={"prompt": "a", "max_tokens": 5, "stream": True})
    assert response.status_code == 500
    response.close()
    assert [mv.leases for mv in repo_of(app).versions()] == [0, 0, 0]
