"""Traffic between a model's versions: weights from traffic.json or TRAFFIC_WEIGHTS, sticky by `user` and
API key, sessions on their version, and the quality gate. Through the real app and its test client;
tests/test_traffic_server.py has the gunicorn server."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from service.models.repository import ModelRepository
from service.models.traffic import TrafficError, parse_weights, pick, settings_weights
from tests.test_repository import make_app, publish, repo_of

pytestmark = pytest.mark.unit
PROBE = "HAMLET: To be, or not to be, that is the question.\nOPHELIA: Good my lord, how does your honour?\n"


def weights_file(repository: Path, name: str, weights: dict[str, float]) -> None:
    (repository / name / "traffic.json").write_text(json.dumps({"weights": weights}))


@pytest.fixture()
def repository(tmp_path: Path, tiny_artifacts: Path) -> Path:
    root = tmp_path / "models"
    publish(tiny_artifacts, root, "bard", 1)
    publish(tiny_artifacts, root, "bard", 2)
    weights_file(root, "bard", {"1": 90, "2": 10})
    return root


@pytest.fixture()
def app(repository: Path) -> Iterator[Flask]:
    app = make_app(repository)
    yield app
    for mv in repo_of(app).versions():
        mv.engine.close()


def test_weights_parse_or_say_why() -> None:
    assert parse_weights({"1": 90, "2": 10.5}, "w") == {1: 90.0, 2: 10.5}
    for bad in ({}, {"x": 1}, {"0": 1}, {"1": -1}, {"1": True}, {"1": 0, "2": 0}, [1]):
        with pytest.raises(TrafficError):
            parse_weights(bad, "w")
    assert settings_weights('{"m": {"1": 1}}') == {"m": {1: 1.0}} and settings_weights("") == {}
    with pytest.raises(TrafficError):
        settings_weights("{nope")


def test_a_sticky_key_lands_on_one_version_and_keys_split_by_weight() -> None:
    weights = {1: 90.0, 2: 10.0}
    counts = Counter(pick(weights, f"user-{i}") for i in range(2000))
    assert abs(counts[1] / 2000 - 0.9) < 0.03
    assert all(pick(weights, f"user-{i}") == pick(weights, f"user-{i}") for i in range(50))
    assert Counter(pick({1: 0.0, 2: 5.0}, f"k{i}") for i in range(100)) == {2: 100}


def test_unpinned_requests_split_by_weight_and_users_stay(app: Flask) -> None:
    client = app.test_client()
    seen: dict[str, set[str]] = {}
    for i in range(400):
        user = f"reader-{i % 200}"
        body = {"model": "bard", "prompt": "ROMEO:", "max_tokens": 1, "user": user}
        answer = client.post("/v1/completions", json=body).get_json()
        seen.setdefault(user, set()).add(answer["model"])
    assert all(len(models) == 1 for models in seen.values())  # each user stayed on one version
    share = sum(models == {"bard@1"} for models in seen.values()) / len(seen)
    assert 0.8 < share < 0.97
    pinned = client.post("/v1/next-token", json={"model": "bard@2", "text": "a"}).get_json()
    assert pinned["model"] == "bard@2"  # a pinned request ignores the weights


def test_models_and_metrics_show_the_weights_in_force(app: Flask, repository: Path) -> None:
    client = app.test_client()
    entries = {e["id"]: e for e in client.get("/v1/models").get_json()["data"]}
    assert entries["bard"]["traffic"] == {"1": 0.9, "2": 0.1} and entries["bard"]["serving"] is True
    assert entries["bard@1"]["traffic_weight"] == 0.9 and entries["bard@2"]["traffic_weight"] == 0.1
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'charlm_model_traffic_weight{model="bard@1"} 0.9' in metrics
    assert 'charlm_model_traffic_weight{model="bard@2"} 0.1' in metrics
    weights_file(repository, "bard", {"2": 1})  # version 1 drains: pinned requests only
    repo_of(app).sync()
    entries = {e["id"]: e for e in client.get("/v1/models").get_json()["data"]}
    assert entries["bard"]["traffic"] == {"1": 0.0, "2": 1.0} and entries["bard@2"]["serving"] is True
    answers = [client.post("/v1/next-token", json={"model": "bard", "text": "a"}).get_json() for _ in range(20)]
    assert {answer["model"] for answer in answers} == {"bard@2"}
    assert client.post("/v1/next-token", json={"model": "bard@1", "text": "a"}).status_code == 200


def test_a_bad_traffic_file_keeps_the_weights_in_force(app: Flask, repository: Path) -> None:
    (repository / "bard" / "traffic.json").write_text('{"weights": {"1": "lots"}}')
    repo_of(app).sync()
    assert repo_of(app).weights_in_force("bard") == {1: 0.9, 2: 0.1}


def test_traffic_weights_setting_serves_without_a_file(repository: Path) -> None:
    (repository / "bard" / "traffic.json").unlink()
    app = make_app(repository, traffic_weights='{"bard": {"1": 1}}')
    try:
        assert repo_of(app).weights_in_force("bard") == {1: 1.0, 2: 0.0}
        assert repo_of(app).serving("bard").version == 1  # type: ignore[union-attr]
    finally:
        for mv in repo_of(app).versions():
            mv.engine.close()


def test_sessions_stay_on_the_version_that_made_them(app: Flask, repository: Path) -> None:
    client = app.test_client()
    first = client.post("/v1/generate", json={"model": "bard@1", "prompt": "KING:", "max_tokens": 5,
                                              "return_session": True}).get_json()  # fmt: skip
    weights_file(repository, "bard", {"2": 1})
    repo_of(app).sync()
    again = client.post("/v1/generate", json={"model": "bard", "prompt": "", "max_tokens": 5,
                                              "session": first["choices"][0]["session"]}).get_json()  # fmt: skip
    assert again["model"] == "bard@1"


# --------------------------------------------------------------------------- the quality gate


def gated_repository(tmp_path: Path, serving: Path, candidate: Path, probe: bool) -> ModelRepository:
    root = tmp_path / "gated"
    publish(serving, root, "bard", 1)
    app = make_app(root, quality_gate_bits=0.05)
    repository = repo_of(app)
    assert repository.serving("bard").version == 1  # type: ignore[union-attr]
    staged = tmp_path / "staged"
    shutil.copytree(candidate, staged)
    if probe:
        (staged / "probe.txt").write_text(PROBE)
    publish(staged, root, "bard", 2)
    repository.sync()
    return repository


def test_the_quality_gate_refuses_a_worse_version(tmp_path: Path, tiny_artifacts: Path, worse_artifacts: Path) -> None:
    for probe in (True, False):  # the probe text, then the manifests' held-out figures
        repository = gated_repository(tmp_path / str(probe), tiny_artifacts, worse_artifacts, probe)
        assert repository.serving("bard").version == 1  # type: ignore[union-attr]
        (refusal,) = repository.refusals().values()
        assert refusal.reason == "quality" and "bits per character" in refusal.message
        repository.sync()  # looked at again only when its files change
        assert [mv.version for mv in repository.versions("bard")] == [1]
        for mv in repository.versions():
            mv.engine.close()


def test_the_quality_gate_promotes_a_better_version(
    tmp_path: Path, tiny_artifacts: Path, worse_artifacts: Path
) -> None:
    repository = gated_repository(tmp_path, worse_artifacts, tiny_artifacts, probe=True)
    assert repository.serving("bard").version == 2 and not repository.refusals()  # type: ignore[union-attr]
    for mv in repository.versions():
        mv.engine.close()


def test_models_lists_a_refused_version_with_its_figures(tmp_path: Path, tiny_artifacts: Path,
                                                          worse_artifacts: Path) -> None:  # fmt: skip
    root = tmp_path / "listed"
    publish(tiny_artifacts, root, "bard", 1)
    publish(worse_artifacts, root, "bard", 2)
    app = make_app(root)  # at start-up the newest is compared with the next one kept
    try:
        entries = {e["id"]: e for e in app.test_client().get("/v1/models").get_json()["data"]}
        (refused,) = entries["bard"]["refused_versions"]
        assert refused["reason"] == "quality" and "bard@2" in refused["message"] and entries["bard"]["versions"] == [1]
    finally:
        for mv in repo_of(app).versions():
            mv.engine.close()


def test_api_keys_stay_on_one_version(repository: Path) -> None:
    keys = [f"reader-key-{i:03d}" for i in range(60)]
    app = make_app(repository, api_keys=",".join(keys))
    try:
        client = app.test_client()
        seen: dict[str, set[str]] = {}
        for _ in range(3):
            for key in keys:
                answer = client.post("/v1/next-token", json={"model": "bard", "text": "a"},
                                     headers={"Authorization": f"Bearer {key}"})  # fmt: skip
                seen.setdefault(key, set()).add(answer.get_json()["model"])
        assert all(len(models) == 1 for models in seen.values())
        assert {model for models in seen.values() for model in models} == {"bard@1", "bard@2"}
    finally:
        for mv in repo_of(app).versions():
            mv.engine.close()
