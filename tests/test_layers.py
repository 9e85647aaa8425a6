"""The layers' import rule ([tool.importlinter] in pyproject.toml, run by `make test` as lint-imports) holds
for the code as it is, and catches what it is there to catch: on a copy of `service/`, an engine module that
imports Flask, or a models module that imports the API, breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit  # no server: `pytest -m unit` runs these in about a minute

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports over the `service` package under `root`, with this project's contracts."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"), "--no-cache"]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture()
def copy_of_service(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "service", tmp_path / "service", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_code_keeps_every_contract(copy_of_service: Path) -> None:
    result = lint_imports(copy_of_service)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module", ["flask", "opentelemetry"])
def test_flask_or_tracing_in_the_engine_breaks_the_rule(copy_of_service: Path, module: str) -> None:
    sampling = copy_of_service / "service" / "engine" / "sampling.py"
    sampling.write_text(sampling.read_text() + f"\nimport {module}  # noqa: E402\n")
    result = lint_imports(copy_of_service)
    assert result.returncode == 1
    assert "the engine and the models know nothing of HTTP or of tracing BROKEN" in result.stdout
    assert f"service.engine.sampling -> {module}" in result.stdout


def test_the_models_importing_the_api_breaks_the_rule(copy_of_service: Path) -> None:
    repository = copy_of_service / "service" / "models" / "repository.py"
    repository.write_text(repository.read_text() + "\nfrom service.api import errors  # noqa: E402\n")
    result = lint_imports(copy_of_service)
    assert result.returncode == 1
    assert "service: server above api above models above engine BROKEN" in result.stdout
