"""KServe: deploy/kserve's ServingRuntime and InferenceService load into KServe's SDK as written, and
KServe's own `InferenceRESTClient` (protocol v2) gets from a real server on loopback what /v1 gives.

The SDK lives in a virtual environment of its own (tests/kserve/requirements.txt says why), which
`make test` makes; tests/kserve/check_kserve.py runs there."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import REPO, gunicorn_server

KSERVE_PYTHON = REPO / ".venv-kserve" / "bin" / "python"
KEY = "kserve-key"
TEXTS = ["ROMEO: But soft", "JULIET: O Romeo"]

pytestmark = pytest.mark.skipif(
    not KSERVE_PYTHON.exists(), reason="KServe's SDK is not installed: `make test` makes .venv-kserve"
)


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path) -> Iterator[str]:
    with gunicorn_server(tiny_artifacts, WORKERS="1", API_KEYS=KEY) as base:
        yield base


@pytest.fixture(scope="module")
def found(server: str) -> Any:
    result = subprocess.run(
        [str(KSERVE_PYTHON), str(REPO / "tests/kserve/check_kserve.py"), str(REPO / "deploy/kserve"), server, KEY,
         "char-lstm", json.dumps(TEXTS)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_the_manifests_load_into_kserves_models(found: Any) -> None:
    assert found["mode"] == "RawDeployment"
    assert found["service_runtime"] == found["runtime"] and found["service_format"] in found["runtime_formats"]
    assert found["service_protocol"] == "v2" and "v2" in found["runtime_protocols"]
    assert found["probes"] == ["/v2/health/ready", "/v2/health/live"]
    assert found["env"]["PORT"] == str(found["port"]) and found["env"]["HOST"] == "0.0.0.0"


def test_kserves_client_gets_what_v1_gives(found: Any, server: str) -> None:
    client = found["client"]
    assert client["live"] and client["ready"] and client["model_ready"] and client["id"] == "kserve-1"
    headers = {"Authorization": f"Bearer {KEY}"}
    scores = requests.post(f"{server}/v1/score", json={"texts": TEXTS}, headers=headers, timeout=30).json()
    labels = requests.post(f"{server}/v1/classify", json={"texts": TEXTS}, headers=headers, timeout=30).json()
    outputs = client["outputs"]
    assert outputs["log_likelihood"] == pytest.approx([r["logprob"] for r in scores["results"]], rel=1e-6)
    assert outputs["label"] == [r["label"] for r in labels["results"]]
    top = requests.post(f"{server}/v1/next-token", json={"text": TEXTS[0], "top_k": 1}, headers=headers, timeout=30)
    best = max(range(len(outputs["vocabulary"])), key=outputs["next_char_probs"][0].__getitem__)
    assert outputs["vocabulary"][best] == top.json()["candidates"][0]["token"]


def test_kserves_client_sees_clear_errors(found: Any) -> None:
    errors = found["client"]["errors"]
    assert errors["wrong datatype"][0] == 400 and "BYTES" in errors["wrong datatype"][1]
    assert errors["unknown input"][0] == 400 and "unknown input" in errors["unknown input"][1]
    assert errors["unknown model"][0] == 404
