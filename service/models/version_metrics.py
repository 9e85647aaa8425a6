"""A model version's engine reporting to Prometheus (service.metrics): the engine's observer, with the
series of the version labelled once."""

from __future__ import annotations

from service.engine.observer import EngineObserver
from service.metrics import (
    DECODE_BATCH_ROWS,
    PREFILL_BATCH_PROMPTS,
    PREFIX_CACHE_BYTES,
    PREFIX_CACHE_HITS,
    PREFIX_CACHE_MISSES,
    PREFIX_CACHE_SAVED,
    PREFIX_CACHE_SHARED_HITS,
    TOKENS_GENERATED,
)


class VersionMetrics(EngineObserver):
    def __init__(self, model_id: str) -> None:
        self.tokens = TOKENS_GENERATED.labels(model=model_id)
        self.hits = PREFIX_CACHE_HITS.labels(model=model_id)
        self.misses = PREFIX_CACHE_MISSES.labels(model=model_id)
        self.saved = PREFIX_CACHE_SAVED.labels(model=model_id)
        self.held = PREFIX_CACHE_BYTES.labels(model=model_id)
        self.shared_hits = PREFIX_CACHE_SHARED_HITS.labels(model=model_id)

    def generated(self, rows: int) -> None:
        self.tokens.inc(rows)
        DECODE_BATCH_ROWS.observe(rows)

    def prefilled(self, prompts: int) -> None:
        PREFILL_BATCH_PROMPTS.observe(prompts)

    def cache_lookup(self, saved: int) -> None:
        if saved:
            self.hits.inc()
            self.saved.inc(saved)
        else:
            self.misses.inc()

    def cache_size(self, held_bytes: int) -> None:
        self.held.set(held_bytes)

    def shared_hit(self) -> None:
        self.shared_hits.inc()
