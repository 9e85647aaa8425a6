"""The artifact format: a versioned folder of safetensors weights and JSON configs, hash-checked.

Everything a model needs at inference time lives inside its artifact folder:
weights in safetensors, and a JSON config holding the architecture, the
vocabulary or the labels, and the text normalization rules. Nothing is pickled.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from seqmodels.networks import (
    UNKNOWN_CHAR,
    AdaptConfig,
    CharLSTM,
    ClassifierConfig,
    LMConfig,
    MLPClassifier,
    Vocab,
)

FORMAT_VERSION = 2  # 2: n-gram classifier, LM regularization and adaptation settings; 1 is refused
MANIFEST = "manifest.json"
LM_DIR = "lm"
CLASSIFIER_DIR = "classifier"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class ArtifactError(Exception):
    """An artifact folder that is missing, malformed, of another format version, or tampered with."""


@dataclass(kw_only=True)
class LoadedModels:
    lm: CharLSTM
    vocab: Vocab
    adapt: AdaptConfig  # dynamic-evaluation settings chosen by the training run (off in older artifacts)
    classifier: MLPClassifier | None  # None: an artifact trained with --no-classifier
    labels: list[str]
    manifest: dict[str, Any]
    digest: str  # SHA-256 of manifest.json: one id for the whole artifact set


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_model(folder: Path, model: nn.Module, config: dict[str, Any]) -> None:
    folder.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def lm_config_json(lm: CharLSTM, vocab: Vocab, min_count: int, adapt: AdaptConfig) -> dict[str, Any]:
    return {
        "kind": "char-lstm-lm",
        "architecture": asdict(lm.config),
        "adaptation": asdict(adapt),
        "vocabulary": list(vocab.chars),
        "normalization": {
            "unit": "one Unicode code point per token; no case folding or Unicode normalization",
            "unknown_char": UNKNOWN_CHAR,
            "unknown_rule": f"training characters seen fewer than {min_count} times, and every character "
            "outside the vocabulary at inference, are mapped to U+FFFD",
            "start_symbol_id": vocab.bos_id,
            "start_rule": "every text is read from the zero state after the start symbol",
        },
    }


def classifier_config_json(classifier: MLPClassifier, labels: list[str], feature_rule: str) -> dict[str, Any]:
    return {
        "kind": "mlp-classifier",
        "architecture": asdict(classifier.config),
        "labels": labels,
        "normalization": {"features": feature_rule},
    }


def _rename_exchange(src: Path, dst: Path) -> bool:
    """Atomically swap two directories with renameat2(RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_exchange)
    return bool(result == 0)


def write_artifacts(
    out_dir: Path,
    lm: CharLSTM,
    lm_config: dict[str, Any],
    classifier: MLPClassifier | None,
    classifier_config: dict[str, Any] | None,
    manifest_fields: dict[str, Any],
    extra_files: dict[str, bytes],
    replace: bool = True,
) -> Path:
    """Write a complete artifact set (the classifier is optional) into a temporary sibling folder, then
    swap it into place.

    The old folder stays untouched until the final swap, so an interrupted run leaves it
    as it was. On Linux the swap is one atomic renameat2(RENAME_EXCHANGE). Without `replace` (a new version
    in a repository), an existing `out_dir` is an error: another writer took that version first.
    """
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the served folder must be readable by the service user
    try:
        _write_model(staging / LM_DIR, lm, lm_config)
        if classifier is not None and classifier_config is not None:
            _write_model(staging / CLASSIFIER_DIR, classifier, classifier_config)
        for name, data in extra_files.items():
            (staging / name).write_bytes(data)
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        manifest = {
            "format_version": FORMAT_VERSION,
            **manifest_fields,
            "files": {name: sha256_file(staging / name) for name in files},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for path in staging.rglob("*"):
            if path.is_file():
                with path.open("rb") as fh:
                    os.fsync(fh.fileno())
        if out_dir.exists() and not replace:
            raise ArtifactError(f"{out_dir}: already exists; another writer published this version first")
        if out_dir.exists():
            if not _rename_exchange(staging, out_dir):
                backup = staging.with_name(staging.name + ".old")
                out_dir.rename(backup)
                staging.rename(out_dir)
                staging = backup
        else:
            staging.rename(out_dir)
            return out_dir
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a model's folder in a repository
MODEL_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
VERSION_NAME = re.compile(r"^[1-9][0-9]{0,8}$")  # a version's folder: a positive integer


def versions_in(model_dir: Path) -> list[int]:
    """The version folders of one model in a repository, ascending; staging folders (".N.staging-...")
    and anything else that is not a positive integer are not versions."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and VERSION_NAME.match(p.name))


def next_version_dir(repository: Path, name: str) -> Path:
    """Where the next version of model `name` goes: `repository/name/N+1` (1 for a new model). Written with
    `write_artifacts`, it appears there by one rename of a finished folder, never half-written."""
    if not MODEL_NAME.match(name):
        raise ArtifactError(f"model name {name!r}: use {MODEL_NAME_RULE}")
    existing = versions_in(repository / name)
    return repository / name / str((existing[-1] if existing else 0) + 1)


def publish_version(source: Path, repository: Path, name: str) -> Path:
    """Copy a finished artifact folder into a repository as the next version of model `name`, the safe way:
    verified, copied beside under a name that is not a version (".N.staging-..."), synced to disk, then
    renamed in, so a server polling the repository never sees it half-written. Returns the new folder."""
    verify_artifacts(source)
    target = next_version_dir(repository, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        staging.chmod(0o755)
        for path in staging.rglob("*"):
            if path.is_file():
                with path.open("rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            raise ArtifactError(f"{target}: already exists; another writer published this version first")
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def read_manifest(artifacts_dir: Path) -> dict[str, Any]:
    path = artifacts_dir / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; is ARTIFACTS_DIR pointing at an artifact folder?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported (expected {FORMAT_VERSION}); "
            "retrain with `python -m training.run` or serve it with the release that wrote it"
        )
    if not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path}: no 'files' table of SHA-256 hashes")
    return manifest


def has_classifier(manifest: dict[str, Any]) -> bool:
    """Whether the artifact carries a classifier: any file under classifier/ in its manifest."""
    return any(str(name).startswith(f"{CLASSIFIER_DIR}/") for name in manifest["files"])


def verify_artifacts(artifacts_dir: Path) -> dict[str, Any]:
    """Check the format version and every recorded SHA-256; return the manifest."""
    manifest = read_manifest(artifacts_dir)
    parts = (LM_DIR, CLASSIFIER_DIR) if has_classifier(manifest) else (LM_DIR,)
    required = {f"{d}/{f}" for d in parts for f in (CONFIG_FILE, WEIGHTS_FILE)}
    missing = required - set(manifest["files"])
    if missing:
        raise ArtifactError(f"{artifacts_dir / MANIFEST}: does not list {', '.join(sorted(missing))}")
    for name, expected in manifest["files"].items():
        path = artifacts_dir / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"{path}: SHA-256 mismatch (manifest {expected[:12]}..., file {actual[:12]}...)")
    return manifest


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), dict):
        raise ArtifactError(f"{path}: no 'architecture' object")
    return config


def _load_weights(module: nn.Module, path: Path) -> None:
    try:
        tensors = load_file(str(path))
        module.load_state_dict(tensors, strict=True)
    except (RuntimeError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: weights do not fit the config ({str(exc).splitlines()[0]})") from None


def _load_classifier(artifacts_dir: Path) -> tuple[MLPClassifier, list[str]]:
    clf_json = _read_config(artifacts_dir / CLASSIFIER_DIR / CONFIG_FILE)
    try:
        labels = [str(label) for label in clf_json["labels"]]
        classifier = MLPClassifier(ClassifierConfig(**clf_json["architecture"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{artifacts_dir}: classifier config does not describe a model ({exc!r})") from None
    if len(labels) != classifier.config.num_labels:
        raise ArtifactError(f"{artifacts_dir / CLASSIFIER_DIR / CONFIG_FILE}: label count disagrees with architecture")
    _load_weights(classifier, artifacts_dir / CLASSIFIER_DIR / WEIGHTS_FILE)
    classifier.eval()
    return classifier, labels


def load_artifacts(artifacts_dir: Path | str) -> LoadedModels:
    """Verify and load the LM (and the classifier, where the artifact has one) in eval mode. Raises
    ArtifactError naming what is wrong."""
    artifacts_dir = Path(artifacts_dir)
    manifest = verify_artifacts(artifacts_dir)
    lm_json = _read_config(artifacts_dir / LM_DIR / CONFIG_FILE)
    try:
        vocab = Vocab(tuple(lm_json["vocabulary"]))
        lm = CharLSTM(LMConfig(**lm_json["architecture"]))
        adapt = AdaptConfig(**lm_json.get("adaptation", {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{artifacts_dir}: config does not describe a model ({exc!r})") from None
    if vocab.size != lm.config.vocab_size:
        raise ArtifactError(f"{artifacts_dir / LM_DIR / CONFIG_FILE}: vocabulary size disagrees with architecture")
    _load_weights(lm, artifacts_dir / LM_DIR / WEIGHTS_FILE)
    lm.eval()
    classifier, labels = _load_classifier(artifacts_dir) if has_classifier(manifest) else (None, [])
    return LoadedModels(
        lm=lm,
        vocab=vocab,
        adapt=adapt,
        classifier=classifier,
        labels=labels,
        manifest=manifest,
        digest=sha256_file(artifacts_dir / MANIFEST),
    )
