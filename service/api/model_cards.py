"""The /v1/models entries: one per model (its serving version, with the versions loaded) and one per
loaded version, OpenAI's model object with the model card's figures (networks, hashes, held-out metrics,
memory, precision)."""

from __future__ import annotations

import calendar
import time
from pathlib import Path
from typing import Any

from seqmodels.artifacts import CLASSIFIER_DIR, LM_DIR, WEIGHTS_FILE
from service.models.repository import ModelRepository, ModelVersion


def model_entries(repository: ModelRepository) -> list[dict[str, Any]]:
    """Every model's entry (the serving version's card under the model's name), then each loaded version's."""
    default = repository.default_name()
    entries = []
    for name in sorted({mv.name for mv in repository.versions()}):
        versions = repository.versions(name)
        if not versions:
            continue
        serving = repository.serving(name)
        weights = repository.weights_in_force(name)
        cards = [
            describe_version(mv, mv is serving, default=name == default and mv is serving)
            | {"traffic_weight": weights.get(mv.version, 0.0)}
            for mv in versions
        ]
        refused = [
            {"path": path, "reason": refusal.reason, "message": refusal.message}
            for path, refusal in sorted(repository.refusals().items())
            if Path(path).parent.name == name or repository.settings.model_repository is None
        ]
        card = next(c for c, mv in zip(cards, versions, strict=True) if mv is serving)
        shadow = repository.shadow_in_force(name)
        entries.append(card | {
            "id": name,
            "versions": [mv.version for mv in versions],
            "traffic": {str(v): w for v, w in weights.items()},
            "shadow": None if shadow is None else {"version": shadow.version, "percent": shadow.percent},
            "refused_versions": refused,
        })  # fmt: skip
        entries += cards
    return entries


def describe_version(mv: ModelVersion, serving: bool, default: bool) -> dict[str, Any]:
    """One version's entry in /v1/models: its networks, hashes, held-out metrics and memory."""
    models = mv.engine.models
    manifest = models.manifest
    shared = mv.engine.prefix_cache.shared if mv.engine.prefix_cache is not None else None
    try:
        stamp = time.strptime(str(manifest.get("created")), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:  # a manifest without a readable stamp still lists
        stamp = time.gmtime(0)
    metrics = manifest.get("metrics", {})
    lm_metrics = metrics.get("lm", {})
    clf_metrics = metrics.get("classifier") or {}
    lm_card = {
        "kind": "char-lstm-lm",
        "vocab_size": models.vocab.size,
        "parameters": models.lm.num_parameters(),
        "architecture": vars(models.lm.config),
        "metrics": {k: lm_metrics.get(k) for k in ("test_bpc", "val_bpc")}
        | {
            "ppmd_test_bpc": lm_metrics.get("ppmd", {}).get("bpc"),
            "adaptive_test_bpc": lm_metrics.get("adaptive", {}).get("test_bpc"),
        },
        "adaptation": vars(models.adapt),
        "artifact_sha256": manifest["files"][f"{LM_DIR}/{WEIGHTS_FILE}"],
    }
    classifier_card = None
    if models.classifier is not None:
        cv = clf_metrics.get("cross_validation")
        classifier_card = {
            "kind": "mlp-classifier",
            "labels": models.labels,
            "parameters": models.classifier.num_parameters(),
            "metrics": {k: clf_metrics.get(k) for k in ("mlp", "tfidf_logreg", "majority") if k in clf_metrics}
            | (
                {"cross_validated_macro_f1": {m: f["macro_f1"]["mean"] for m, f in cv["summary"].items()}}
                if cv is not None
                else {}
            ),
            "artifact_sha256": manifest["files"][f"{CLASSIFIER_DIR}/{WEIGHTS_FILE}"],
        }
    return {
        "id": mv.id,
        "object": "model",
        "created": calendar.timegm(stamp),  # the stamp is UTC; time.mktime would read it as local time
        "owned_by": "local",
        "root": mv.name,
        "version": mv.version,
        "serving": serving,
        "default": default,
        "lm": lm_card,
        "classifier": classifier_card,
        "corpus": manifest.get("corpus", {}).get("description"),
        "speakers": [name for name, _ in manifest.get("corpus", {}).get("speakers", [])] or None,
        "manifest_sha256": mv.digest,
        "precision": mv.precision,
        "memory_bytes": mv.memory_bytes,
        "shared_cache_bytes": 0 if shared is None else shared.nbytes,
        "load_seconds": round(mv.load_seconds, 3),
    }
