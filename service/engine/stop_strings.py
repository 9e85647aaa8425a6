"""Stop strings found in a growing text, never released to the client."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from service.engine.types import TokenScore


@dataclass
class StopMatcher:
    """Finds stop strings in a growing text, holding back any tail that could still begin one,
    so that a stop string split across steps is caught and never reaches the client."""

    stops: Sequence[str]
    pending: list[TokenScore] = field(default_factory=list)

    def push(self, token: TokenScore) -> tuple[list[TokenScore], bool]:
        """Tokens safe to release now, and whether a stop string was found (its text is dropped)."""
        self.pending.append(token)
        text = "".join(t.token for t in self.pending)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], []
            return out, True
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> list[TokenScore]:
        out, self.pending = self.pending, []
        return out
