"""The artifact format: hash and version checks, and the committed artifacts themselves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from seqmodels.artifacts import FORMAT_VERSION, ArtifactError, load_artifacts, sha256_file
from service.api.app import create_app
from service.models.versions import RepositoryError
from service.settings import Settings
from tests.conftest import COMMITTED_ARTIFACTS

pytestmark = pytest.mark.unit  # no server: `pytest -m unit` runs these in about a minute


@pytest.fixture()
def copy(tmp_path: Path, tiny_artifacts: Path) -> Path:
    target = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, target)
    return target


def test_tampered_weights_are_refused(copy: Path) -> None:
    weights = copy / "lm" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"lm/model\.safetensors: SHA-256 mismatch"):
        load_artifacts(copy)


def test_truncated_config_is_refused(copy: Path) -> None:
    config = copy / "classifier" / "config.json"
    config.write_bytes(config.read_bytes()[:20])
    with pytest.raises(ArtifactError, match=r"classifier/config\.json: SHA-256 mismatch"):
        load_artifacts(copy)


def test_missing_file_is_refused(copy: Path) -> None:
    (copy / "classifier" / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="listed in the manifest but missing"):
        load_artifacts(copy)


def test_other_format_version_is_refused(copy: Path) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"format_version {FORMAT_VERSION + 1} is not supported"):
        load_artifacts(copy)


def test_version_1_artifacts_are_refused_with_the_version_named(copy: Path) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"format_version 1 is not supported \(expected 2\); retrain"):
        load_artifacts(copy)


def test_consistent_but_wrong_weights_are_refused(copy: Path, tiny_artifacts: Path) -> None:
    """Weights swapped between models, with the manifest rewritten to match, still fail the shape check."""
    shutil.copy(tiny_artifacts / "classifier" / "model.safetensors", copy / "lm" / "model.safetensors")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["lm/model.safetensors"] = sha256_file(copy / "lm" / "model.safetensors")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="weights do not fit the config"):
        load_artifacts(copy)


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"manifest\.json: missing"):
        load_artifacts(tmp_path / "nothing")


def test_app_refuses_to_start_on_tampered_artifacts(copy: Path) -> None:
    (copy / "MODEL_CARD.md").write_text("edited")
    with pytest.raises(RepositoryError, match=r"no model could be loaded .*MODEL_CARD\.md: SHA-256 mismatch"):
        create_app(Settings(artifacts_dir=copy))


def test_committed_artifacts_load_and_pass_their_hash_check() -> None:
    models = load_artifacts(COMMITTED_ARTIFACTS)
    manifest = models.manifest
    assert manifest["command"].startswith("python -m training.run")
    assert models.labels == ["comedies", "histories", "problems", "roman", "romances", "tragedies"]
    # 13 MB of LSTM and 17 MB of n-gram classifier (its first layer is 32,768 buckets x 128 floats).
    assert sum(p.stat().st_size for p in COMMITTED_ARTIFACTS.rglob("*") if p.is_file()) < 40 * 1024 * 1024
    lm_metrics = manifest["metrics"]["lm"]
    assert lm_metrics["test_bpc"] > 0 and lm_metrics["ppmd"]["bpc"] > 0
