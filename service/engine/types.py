"""The engine's data types: what a generation request asks for, what it gets back piece by piece, and
where a session stopped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from service.engine.sampling import SamplingParams

# Why a choice ended: its stop string, max_tokens, the request's deadline, or the server stopping (SIGTERM).
FinishReason = Literal["length", "stop", "deadline", "shutdown"]


@dataclass
class TokenScore:
    token: str
    logprob: float
    top_logprobs: dict[str, float] | None = None  # the most likely characters at this position


@dataclass(frozen=True)
class SessionState:
    """Where a generated choice stopped: the state after everything the model read and generated but its
    last character, and that character (not yet fed). Continuing from it equals generating from the full
    text: the prompt, then every generated character, a matched stop string included."""

    h: torch.Tensor  # (layers, H)
    c: torch.Tensor  # (layers, H)
    next_id: int


@dataclass(frozen=True)
class SequenceState:
    """Where a sequence of requests stands (the Open Inference Protocol's sequences): the state after every
    character it has read, and the logits (V,) of the character that comes next."""

    h: torch.Tensor  # (layers, H)
    c: torch.Tensor  # (layers, H)
    logits: torch.Tensor  # (V,)


@dataclass(kw_only=True, frozen=True)
class GenerationRequest:
    prompt: str
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: Sequence[str] = ()
    n: int = 1
    top_logprobs: int = 0  # alternatives to report per generated character
    deadline: float | None = None  # time.monotonic() after which every choice ends with finish_reason "deadline"
    session: SessionState | None = None  # continue from here; `prompt` is then the text that follows
    keep_session: bool = False  # each choice's last piece carries its SessionState

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"a generation needs n >= 1 and max_tokens >= 1, not {self.n} and {self.max_tokens}")


@dataclass(kw_only=True)
class Delta:
    """A piece of one choice's text as it is released; the last piece of a choice has `finish_reason`.

    `tokens` holds one entry per released character, with its log-probability under the
    model (before temperature, top-k/top-p or penalties) and, when asked, the top alternatives.
    """

    index: int
    text: str
    tokens: list[TokenScore]
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0  # on the last piece: characters generated, a matched stop string included
    cumulative_logprob: float = 0.0  # on the last piece: sum of the generated characters' log-probabilities
    session: SessionState | None = None  # on the last piece, when the request keeps sessions
