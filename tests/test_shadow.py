"""Shadow traffic: a sample of a model's requests run again on a candidate version after the answer, and the
two compared in Prometheus. Through the real app and its test client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from tests.test_repository import make_app, publish, repo_of

pytestmark = pytest.mark.unit
TEXTS = ["ROMEO: But soft, what light", "JULIET: O Romeo, Romeo", "KING: Speak"]


def shadow_app(root: Path, serving: Path, candidate: Path, percent: float) -> Flask:
    publish(serving, root, "bard", 1)
    publish(candidate, root, "bard", 2)
    plan = {"weights": {"1": 1}, "shadow": {"version": 2, "percent": percent}}
    (root / "bard" / "traffic.json").write_text(json.dumps(plan))
    return make_app(root, quality_gate=False)


@pytest.fixture()
def closing_apps() -> Iterator[list[Flask]]:
    apps: list[Flask] = []
    yield apps
    for app in apps:
        for mv in repo_of(app).versions():
            mv.engine.close()


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """What one test's requests added (the metrics live in the process, across apps)."""
    compared = {k: v - before["compared"].get(k, 0.0) for k, v in after["compared"].items()}
    return {
        "bits": {v: after["bits"][v] - before["bits"][v] for v in after["bits"]},
        "chars": after["chars"] - before["chars"],
        "compared": {k: v for k, v in compared.items() if v},
        "agree": after["agree"] - before["agree"],
    }


def measured(app: Flask) -> tuple[list[bytes], dict[str, Any]]:
    """The answers to `traffic`, and the shadow figures it added."""
    before = shadow_figures(app)
    bodies = traffic(app)
    return bodies, delta(shadow_figures(app), before)


def traffic(app: Flask) -> list[bytes]:
    """A few requests of each kind the shadow compares; the bodies of their answers."""
    client = app.test_client()
    bodies = []
    for text in TEXTS:
        bodies.append(client.post("/v1/next-token", json={"model": "bard", "text": text}).get_data())
        bodies.append(client.post("/v1/score", json={"model": "bard", "texts": [text]}).get_data())
        generated = client.post("/v1/generate", json={"model": "bard", "prompt": text, "max_tokens": 20, "seed": 3})
        bodies.append(generated.get_data())
    assert repo_of(app).shadow.idle(60)
    return bodies


def shadow_figures(app: Flask) -> dict[str, Any]:
    text = app.test_client().get("/metrics").get_data(as_text=True)
    figures: dict[str, Any] = {"bits": {"serving": 0.0, "candidate": 0.0}, "chars": 0.0, "compared": {}, "agree": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "charlm_shadow_bits_total":
                figures["bits"][sample.labels["version"]] += sample.value
            elif sample.name == "charlm_shadow_chars_total":
                figures["chars"] += sample.value
            elif sample.name == "charlm_shadow_comparisons_total":
                figures["compared"][sample.labels["kind"]] = sample.value
            elif sample.name == "charlm_shadow_top1_agreements_total":
                figures["agree"] += sample.value
    return figures


def test_shadow_on_a_copy_reads_no_difference(tmp_path: Path, tiny_artifacts: Path, closing_apps: list[Flask]) -> None:
    app = shadow_app(tmp_path / "models", tiny_artifacts, tiny_artifacts, percent=100)
    closing_apps.append(app)
    _, figures = measured(app)
    assert figures["compared"] == {"next_token": 3, "score": 3, "generation": 3}
    assert figures["chars"] > 0
    assert figures["bits"]["candidate"] == pytest.approx(figures["bits"]["serving"], rel=1e-6)
    assert figures["agree"] == 3  # 100 % agreement on the next character
    model = {e["id"]: e for e in app.test_client().get("/v1/models").get_json()["data"]}["bard"]
    assert model["shadow"] == {"version": 2, "percent": 100.0} and model["traffic"] == {"1": 1.0, "2": 0.0}


def test_shadow_on_a_worse_version_reads_worse(tmp_path: Path, tiny_artifacts: Path, worse_artifacts: Path,
                                                closing_apps: list[Flask]) -> None:  # fmt: skip
    app = shadow_app(tmp_path / "models", tiny_artifacts, worse_artifacts, percent=100)
    closing_apps.append(app)
    _, figures = measured(app)
    serving, candidate = (figures["bits"][v] / figures["chars"] for v in ("serving", "candidate"))
    assert candidate > serving + 0.2, (serving, candidate)  # bits per character, clearly worse


def test_answers_are_the_same_with_shadow_on_and_off(tmp_path: Path, tiny_artifacts: Path, worse_artifacts: Path,
                                                      closing_apps: list[Flask]) -> None:  # fmt: skip
    on = shadow_app(tmp_path / "on", tiny_artifacts, worse_artifacts, percent=100)
    off = shadow_app(tmp_path / "off", tiny_artifacts, worse_artifacts, percent=0)
    closing_apps += [on, off]
    (answers_on, figures_on), (answers_off, figures_off) = measured(on), measured(off)
    assert answers_on == answers_off
    assert figures_on["compared"] and not figures_off["compared"]


def test_a_full_shadow_queue_drops_and_never_blocks(tmp_path: Path, tiny_artifacts: Path,
                                                     closing_apps: list[Flask]) -> None:  # fmt: skip
    app = shadow_app(tmp_path / "models", tiny_artifacts, tiny_artifacts, percent=100)
    closing_apps.append(app)
    repository = repo_of(app)
    serving = repository.serving("bard")
    assert serving is not None
    for _ in range(200):  # far more than the queue holds, offered faster than one thread compares them
        repository.mirror(serving, "score", "ROMEO: " * 40)
    assert repository.shadow.idle(120)
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'charlm_shadow_dropped_total{model="bard"}' in text
