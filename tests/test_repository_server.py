"""A repository of two models, each in two versions, served by the shipped gunicorn config: the committed
Shakespeare model and a tiny model trained here on Russian text (Cyrillic, no classifier). `model` selects
each on every endpoint, over HTTP and through the `openai` client."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from seqmodels.artifacts import publish_version
from tests.conftest import COMMITTED_ARTIFACTS, gunicorn_server

CYRILLIC = re.compile(r"[\u0400-\u04ff]")
LATIN = re.compile(r"[A-Za-z]")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cyrillic_artifacts: Path) -> Iterator[str]:
    repository = tmp_path_factory.mktemp("served-models")
    for _ in range(2):
        publish_version(COMMITTED_ARTIFACTS, repository, "shakespeare")
        publish_version(cyrillic_artifacts, repository, "russian")
    with gunicorn_server(COMMITTED_ARTIFACTS, MODEL_REPOSITORY=str(repository), DEFAULT_MODEL="shakespeare") as base:
        yield base


def post(server: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = requests.post(f"{server}{path}", json=body, timeout=30)
    return response.status_code, response.json()


def test_models_and_versions_are_listed(server: str) -> None:
    cards = requests.get(f"{server}/v1/models", timeout=10).json()["data"]
    assert [c["id"] for c in cards] == [
        "russian",
        "russian@2",
        "russian@1",
        "shakespeare",
        "shakespeare@2",
        "shakespeare@1",
    ]
    ready = requests.get(f"{server}/readyz", timeout=10).json()
    assert ready["models"] == {"russian": 2, "shakespeare": 2}


@pytest.mark.parametrize(
    "model,script,other", [("russian", CYRILLIC, LATIN), ("shakespeare@1", LATIN, CYRILLIC), (None, LATIN, CYRILLIC)]
)
def test_model_selects_on_every_endpoint(
    server: str, model: str | None, script: re.Pattern[str], other: re.Pattern[str]
) -> None:
    chosen = {} if model is None else {"model": model}
    answered = {"russian": "russian@2", "shakespeare@1": "shakespeare@1"}.get(model or "", "shakespeare@2")
    status, body = post(server, "/v1/generate", {**chosen, "prompt": "", "max_tokens": 60, "seed": 1})
    assert status == 200 and body["model"] == answered
    text = body["choices"][0]["text"]
    assert script.search(text) and not other.search(text), text
    status, body = post(server, "/v1/next-token", {**chosen, "text": "", "top_k": 5})
    assert status == 200 and body["model"] == answered
    status, body = post(server, "/v1/score", {**chosen, "texts": ["Утром над рекой стоял туман."]})
    assert status == 200 and body["model"] == answered
    status, body = post(server, "/v1/classify", {**chosen, "texts": ["My liege, the French are landed."]})
    if model == "russian":
        assert status == 400 and body["error"]["code"] == "no_classifier"
    else:
        assert status == 200 and body["model"] == answered


def test_each_model_reads_its_own_language_best(server: str) -> None:
    def bits(model: str, text: str) -> float:
        status, body = post(server, "/v1/score", {"model": model, "texts": [text]})
        assert status == 200
        return float(body["results"][0]["bits_per_char"])

    russian, english = "Вечером бабушка читала вслух письма.", "Good morrow, my lord; what news from France?"
    assert bits("russian", russian) < bits("shakespeare", russian)
    assert bits("shakespeare", english) < bits("russian", english)


def test_the_openai_client_selects_each_model(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=30)
    assert {m.id for m in client.models.list()} >= {"russian", "shakespeare@1"}
    russian = client.completions.create(model="russian", prompt="Утром", max_tokens=40, seed=2)
    assert russian.model == "russian@2" and CYRILLIC.search(russian.choices[0].text)
    plays = client.completions.create(model="shakespeare", prompt="ROMEO.\n", max_tokens=40, seed=2)
    assert plays.model == "shakespeare@2" and LATIN.search(plays.choices[0].text)
    with pytest.raises(openai.NotFoundError) as refused:
        client.completions.create(model="shakespeare@9", prompt="a", max_tokens=1)
    assert refused.value.code == "model_not_found"
