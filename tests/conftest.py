"""Shared fixtures: a tiny artifact set built by the real training code, and the app on top of it."""
# ruff: noqa: RUF001 - the Russian test corpus is Cyrillic on purpose

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import torch
from flask import Flask
from flask.testing import FlaskClient

from benchmarks.servers import GunicornProcess, start_gunicorn, stop
from service.api.app import create_app
from service.settings import Settings
from training.corpus import load_plays
from training.run import main as train_main

torch.set_num_threads(1)  # the tiny models are faster on one thread, and CI has only two cores

REPO = Path(__file__).resolve().parent.parent
COMMITTED_ARTIFACTS = REPO / "artifacts"

# Small but real: two genres, four plays each, a slice of each play.
TINY_PLAYS = {
    "comedies": ["as-you-like-it", "twelfth-night", "much-ado-about-nothing", "the-comedy-of-errors"],
    "tragedies": ["hamlet", "macbeth", "othello", "king-lear"],
}
TINY_TRAIN_ARGS = [
    "--hidden-size", "32", "--layers", "1", "--embed-dim", "16", "--batch-size", "8", "--seq-len", "32",
    "--max-steps", "40", "--eval-every", "20", "--train-passages", "20", "--eval-passages", "4",
    "--classifier-hidden", "16", "--seed", "7", "--adapt-lrs", "0.1", "--adapt-segments", "40", "--cv-folds", "2",
]  # fmt: skip


def wait_ready(proc: GunicornProcess, base: str, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while True:
        assert proc.poll() is None, proc.output()
        try:
            if requests.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"gunicorn did not become ready within {limit:.0f} s"
        time.sleep(0.2)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def booted_workers(master: int, count: int, limit: float = 30) -> list[int]:
    """The master's workers once all `count` have forked (/readyz answers as soon as the first is up)."""
    deadline = time.monotonic() + limit
    while len(found := children(master)) < count:
        assert time.monotonic() < deadline, f"only {found} of {count} workers started"
        time.sleep(0.1)
    return found


@contextmanager
def gunicorn_process(artifacts: Path, **env: str) -> Iterator[tuple[GunicornProcess, str]]:
    """A ready server; yields (master process, base URL) and stops it with SIGTERM afterwards."""
    proc, base = start_gunicorn(artifacts, **env)
    try:
        wait_ready(proc, base)
        yield proc, base
    finally:
        stop(proc)


@contextmanager
def gunicorn_server(artifacts: Path, **env: str) -> Iterator[str]:
    with gunicorn_process(artifacts, **env) as (_, base):
        yield base


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    plays = {doc.name: doc for doc in load_plays()}
    for genre, names in TINY_PLAYS.items():
        (root / genre).mkdir()
        for name in names:
            (root / genre / f"{name}.txt").write_text(plays[f"{genre}/{name}"].text[:6000], encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "artifacts"
    assert train_main(["--corpus", str(tiny_corpus), "--out", str(out), *TINY_TRAIN_ARGS]) == 0
    return out


@pytest.fixture(scope="session")
def worse_artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """The tiny model's recipe stopped after 3 training steps: a clearly worse version of it."""
    out = tmp_path_factory.mktemp("worse") / "artifacts"
    args = [*TINY_TRAIN_ARGS]
    args[args.index("--max-steps") + 1], args[args.index("--eval-every") + 1] = "3", "3"
    assert train_main(["--corpus", str(tiny_corpus), "--out", str(out), *args]) == 0
    return out


# Not English and not Latin script: Russian sentences written for these tests, read as a corpus of three
# documents with no labels, so the model is trained with --no-classifier.
CYRILLIC_SENTENCES = [
    "Утром над рекой стоял густой туман, и лодки медленно выходили из гавани.",
    "Старый учитель открыл окно, и в комнату вошёл запах мокрой травы.",
    "На площади продавали яблоки, мёд и тёплый хлеб с тмином.",
    "Дети бежали к мосту, потому что поезд уже показался за лесом.",
    "Вечером бабушка читала вслух письма, которые пришли издалека.",
    "Зимой дорога в деревню шла через замёрзшее озеро.",
    "Он долго молчал, а потом сказал, что завтра будет ясная погода.",
    "В библиотеке было тихо, только часы считали минуты на стене.",
    "Кошка спала на подоконнике, а ветер качал голые ветки берёзы.",
    "Мы вернулись домой поздно ночью и долго пили чай на кухне.",
]
CYRILLIC_TRAIN_ARGS = [
    "--hidden-size", "32", "--layers", "1", "--embed-dim", "16", "--batch-size", "8", "--seq-len", "32",
    "--max-steps", "40", "--eval-every", "20", "--seed", "3", "--adapt-lrs", "0.1", "--adapt-segments", "40",
    "--no-classifier",
]  # fmt: skip


@pytest.fixture(scope="session")
def cyrillic_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cyrillic")
    rng = random.Random(5)
    for name in ("осень", "зима", "весна"):
        lines = [rng.choice(CYRILLIC_SENTENCES) for _ in range(120)]
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def cyrillic_artifacts(tmp_path_factory: pytest.TempPathFactory, cyrillic_corpus: Path) -> Path:
    """A language model only, trained on Russian text and written as version 1 into a repository."""
    repository = tmp_path_factory.mktemp("trained")
    args = ["--corpus", str(cyrillic_corpus), "--repository", str(repository), "--name", "cyrillic"]
    assert train_main([*args, *CYRILLIC_TRAIN_ARGS]) == 0
    return repository / "cyrillic" / "1"


@pytest.fixture(scope="session")
def settings(tiny_artifacts: Path) -> Settings:
    return Settings(artifacts_dir=tiny_artifacts, max_texts=4, max_text_chars=300, max_tokens=50, max_n=3)


@pytest.fixture(scope="session")
def app(settings: Settings) -> Flask:
    application = create_app(settings)
    application.config.update(TESTING=True)
    return application


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    return app.test_client()
