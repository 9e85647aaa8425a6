"""What the engine reports as it works, in one object: the service's metrics subclass it
(service.models.runtime), tests record with it, and the base class ignores everything."""

from __future__ import annotations


class EngineObserver:
    """Every method is called on the thread doing the work, so each must be quick and never raise."""

    def generated(self, rows: int) -> None:
        """A decode step produced one character for each of `rows` sequences."""

    def prefilled(self, prompts: int) -> None:
        """A batch of `prompts` prompts (or pieces of them) was encoded."""

    def cache_lookup(self, saved: int) -> None:
        """The prefix cache was looked up and saved encoding `saved` characters (0: a miss)."""

    def cache_size(self, held_bytes: int) -> None:
        """The prefix cache now holds `held_bytes`."""

    def shared_hit(self) -> None:
        """The pod-wide level had a longer prefix than this worker's cache."""


IGNORED = EngineObserver()
