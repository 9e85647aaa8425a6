"""Prometheus metrics. Under gunicorn, `PROMETHEUS_MULTIPROC_DIR` (set by gunicorn.conf.py)
makes every worker write its values to shared files, and /metrics sums them."""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

REQUESTS = Counter("charlm_http_requests_total", "HTTP requests", ["method", "route", "status"])
REQUEST_LATENCY = Histogram(
    "charlm_http_request_duration_seconds",
    "Time to the response headers (for a stream: to its first byte)",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
IN_FLIGHT = Gauge(
    "charlm_http_requests_in_flight", "Requests being handled, streams until they close", multiprocess_mode="livesum"
)
OPEN_CONNECTIONS = Gauge(
    "charlm_connections_open", "Client connections open, reading, in use or kept alive", multiprocess_mode="livesum"
)
REQUESTS_WAITING = Gauge(
    "charlm_requests_waiting", "Complete requests waiting for a free request thread", multiprocess_mode="livesum"
)
REQUESTS_IN_SYSTEM = Gauge(
    "charlm_model_requests_in_system",
    "Model requests a worker holds: running on a request thread or waiting for one",
    multiprocess_mode="livesum",
)
EXPECTED_WAIT = Gauge(
    "charlm_expected_wait_seconds",
    "The signal to scale on: how long the work a worker holds takes to drain at the rate it has been answering "
    "(requests held / requests answered per second), the largest over the pod's workers",
    multiprocess_mode="livemax",
)
REQUESTS_REFUSED = Counter(
    "charlm_requests_refused_total",
    "Requests answered by the worker's event loop without reaching the app: overloaded (503), "
    "headers_too_large (431), body_too_large (413)",
    ["reason"],
)
CONNECTIONS_TIMED_OUT = Counter(
    "charlm_connections_timed_out_total",
    "Connections closed at a deadline: nothing sent (idle), headers or body not arrived in time (408), "
    "or a write not sent in time",
    ["phase"],
)
LOOP_FAILURES = Counter(
    "charlm_loop_failures_total",
    "Events of a worker's event loop that raised: each closed its connection and the worker went on "
    "(the log has the first one's traceback)",
)
QUOTA_REFUSED = Counter(
    "charlm_quota_refusals_total", "Requests refused by their API key's limits (key: a short hash)", ["key", "limit"]
)
GRPC_REQUESTS = Counter("charlm_grpc_requests_total", "gRPC calls of the inference protocol", ["method", "code"])
GRPC_REQUEST_LATENCY = Histogram(
    "charlm_grpc_request_duration_seconds", "gRPC call latency, to the last response of a stream", ["method"]
)
CHARS_SCORED = Counter("charlm_chars_scored_total", "Characters scored by /v1/score and echoed prompts", ["model"])
CLASSIFIED = Counter("charlm_texts_classified_total", "Texts classified", ["model"])
MODEL_LOAD_SECONDS = Gauge(
    "charlm_model_load_seconds", "Time to verify and load a model version", ["model"], multiprocess_mode="livemax"
)
MODEL_MEMORY_BYTES = Gauge(
    "charlm_model_memory_bytes",
    "Memory a loaded model version holds (weights, packed kernels, prefix cache bound), summed over the workers",
    ["model"],
    multiprocess_mode="livesum",
)
MODEL_TRAFFIC_WEIGHT = Gauge(
    "charlm_model_traffic_weight",
    "Share of its model's unpinned requests a loaded version takes (0 to 1), per worker",
    ["model"],
    multiprocess_mode="liveall",
)
SHADOW_LABELS = ["serving", "candidate", "kind"]
SHADOW_COMPARISONS = Counter(
    "charlm_shadow_comparisons_total", "Requests run again on a shadow candidate and compared", SHADOW_LABELS
)
SHADOW_CHARS = Counter("charlm_shadow_chars_total", "Characters both versions of a comparison scored", SHADOW_LABELS)
SHADOW_BITS = Counter(
    "charlm_shadow_bits_total",
    "Bits each version (version=serving|candidate) spent on the compared characters",
    [*SHADOW_LABELS, "version"],
)
SHADOW_TOP1_AGREEMENTS = Counter(
    "charlm_shadow_top1_agreements_total",
    "Next-token comparisons where both versions rank the same character first",
    ["serving", "candidate"],
)
SHADOW_DROPPED = Counter("charlm_shadow_dropped_total", "Shadow comparisons dropped, the queue being full", ["model"])
MODEL_SERVING_VERSION = Gauge(
    "charlm_model_serving_version",
    "The version that serves requests naming the model, per worker",
    ["model"],
    multiprocess_mode="liveall",
)
MODEL_VERSIONS_REFUSED = Counter(
    "charlm_model_versions_refused_total",
    "Version folders not loaded: unverified (missing, truncated, tampered, another format) or over the memory "
    "budget (memory); counted by each worker, once per state of the folder's files",
    ["reason"],
)
MODEL_REQUESTS = Counter("charlm_model_requests_total", "Requests answered by each model version", ["model"])
TOKENS_GENERATED = Counter("charlm_tokens_generated_total", "Characters generated, over all choices", ["model"])
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
DECODE_BATCH_ROWS = Histogram(
    "charlm_decode_batch_rows",
    "Sequences stepped together in each decode step (cross-request batching)",
    buckets=BATCH_BUCKETS,
)
PREFILL_BATCH_PROMPTS = Histogram(
    "charlm_prefill_batch_prompts", "Prompts encoded together in each prompt batch", buckets=BATCH_BUCKETS
)
GENERATIONS_CANCELLED = Counter(
    "charlm_generations_cancelled_total", "Streaming generations stopped early because the client went away"
)

PREFIX_CACHE_HITS = Counter(
    "charlm_prefix_cache_hits_total", "Prompts and scored texts that started from a cached prefix", ["model"]
)
PREFIX_CACHE_MISSES = Counter("charlm_prefix_cache_misses_total", "Prefix cache lookups that found nothing", ["model"])
PREFIX_CACHE_SHARED_HITS = Counter(
    "charlm_prefix_cache_shared_hits_total",
    "Lookups answered by the pod-wide level: a prefix another worker (or this one, evicted since) encoded",
    ["model"],
)
PREFIX_CACHE_SAVED = Counter(
    "charlm_prefix_cache_chars_saved_total", "Prompt positions (characters, start symbols) not encoded", ["model"]
)
PREFIX_CACHE_BYTES = Gauge(
    "charlm_prefix_cache_bytes",
    "Bytes held by the prefix caches of the live workers",
    ["model"],
    multiprocess_mode="livesum",
)
PREFIX_CACHE_SHARED_BYTES = Gauge(
    "charlm_prefix_cache_shared_bytes",
    "Shared memory reserved for each model version's pod-wide prefix cache table; below SHARED_PREFIX_CACHE_MB "
    "where the filesystem had less free, 0 where it had no room (the shared level is then off)",
    ["model"],
    multiprocess_mode="livemax",
)
SESSIONS_ISSUED = Counter("charlm_sessions_issued_total", "Session handles returned", ["model"])
SESSIONS_RESUMED = Counter("charlm_sessions_resumed_total", "Requests that continued a session", ["model"])


class _WithoutModels:
    """A collector's metrics less the series of the model versions named in `gone` (unloaded versions: the
    per-process files of multiprocess mode keep every series they ever held)."""

    def __init__(self, inner: Collector, gone: Collection[str]) -> None:
        self.inner, self.gone = inner, gone

    def collect(self) -> Iterator[Metric]:
        for metric in self.inner.collect():
            metric.samples = [s for s in metric.samples if s.labels.get("model") not in self.gone]
            yield metric


def render(unloaded: Collection[str] = ()) -> tuple[bytes, str]:
    """The text exposition; `unloaded`: model versions whose series are left out."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        inner: Collector = multiprocess.MultiProcessCollector(None)
    else:
        from prometheus_client import REGISTRY

        inner = REGISTRY
    registry = CollectorRegistry()
    registry.register(_WithoutModels(inner, frozenset(unloaded)))
    return generate_latest(registry), CONTENT_TYPE_LATEST
