"""Prometheus metrics. Under gunicorn, `PROMETHEUS_MULTIPROC_DIR` (set by gunicorn.conf.py)
makes every worker write its values to shared files, and /metrics sums them."""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest, multiprocess

TOKENS_GENERATED = Counter("charlm_tokens_generated_total", "Characters generated, over all choices")
GENERATIONS_CANCELLED = Counter(
    "charlm_generations_cancelled_total", "Streaming generations stopped early because the client went away"
)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
