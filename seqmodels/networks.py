"""The networks: the character vocabulary, the LSTM language model and the MLP classifier.

Shared by `training` (which fits them) and `service` (which serves them); the artifact
format that stores them is `seqmodels.artifacts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

UNKNOWN_CHAR = "\ufffd"  # U+FFFD REPLACEMENT CHARACTER stands for every out-of-vocabulary character
LSTMState = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class Vocab:
    """Characters of the training text; index 0 is U+FFFD and the last index is the start symbol.

    Rule for unseen characters: training characters rarer than `min_count` are replaced
    by U+FFFD before training, so the model learns a real probability for "some rare
    character". At inference every character outside `chars` is mapped to U+FFFD, so any
    string can be scored. The start symbol is only ever an input, never a prediction.
    """

    chars: tuple[str, ...]  # chars[0] == UNKNOWN_CHAR

    def __post_init__(self) -> None:
        if not self.chars or self.chars[0] != UNKNOWN_CHAR or len(set(self.chars)) != len(self.chars):
            raise ValueError("vocabulary must start with U+FFFD and hold distinct characters")
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("every vocabulary entry must be a single character")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.chars)})

    @classmethod
    def from_text(cls, text: str, min_count: int) -> Vocab:
        counts: dict[str, int] = {}
        for ch in text:
            counts[ch] = counts.get(ch, 0) + 1
        kept = sorted(ch for ch, n in counts.items() if n >= min_count and ch != UNKNOWN_CHAR)
        return cls((UNKNOWN_CHAR, *kept))

    @property
    def size(self) -> int:
        """Number of predictable symbols (the output dimension)."""
        return len(self.chars)

    @property
    def bos_id(self) -> int:
        """Input-only start symbol, one past the last character."""
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        return [index.get(ch, 0) for ch in text]

    def normalize(self, text: str) -> str:
        """The text as the model sees it: out-of-vocabulary characters become U+FFFD."""
        return "".join(self.chars[i] for i in self.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)


# --------------------------------------------------------------------------- language model


@dataclass
class LMConfig:
    vocab_size: int = 80  # predictable characters, U+FFFD included; the start symbol is one more input
    embed_dim: int = 64  # character embedding width
    hidden_size: int = 512  # LSTM units per layer
    num_layers: int = 2  # stacked LSTM layers
    dropout: float = 0.3  # between LSTM layers and before the output; training only (0.15 overfit more)


class CharLSTM(nn.Module):
    """Character embedding -> LSTM -> linear; softmax over the vocabulary."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size + 1, config.embed_dim)  # +1: start symbol
        self.lstm = nn.LSTM(
            config.embed_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def zero_state(self, batch: int, device: torch.device | str = "cpu") -> LSTMState:
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def hidden(self, idx: torch.Tensor, state: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        """Top-layer outputs (B, T, H) and the final state, from the zero state when `state` is None."""
        out, new_state = self.lstm(self.embed(idx), state)
        return out, new_state

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        state: LSTMState | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, LSTMState]:
        """Logits (B, T, V) for the character after each input, the mean cross-entropy, and the final state."""
        out, new_state = self.hidden(idx, state)
        logits = self.head(self.drop(out))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss, new_state

    def step(self, ids: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        """One recurrent step for a batch of single characters: logits (B, V) and the new state."""
        logits, _, new_state = self(ids.unsqueeze(1), state=state)
        return logits[:, -1, :], new_state

    def prefill(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, LSTMState]:
        """Run input sequences of one length (start symbol first) from the zero state: the logits
        after the last input (B, V) and the state there."""
        if len({len(s) for s in sequences}) != 1:
            raise ValueError("prefill takes sequences of one length")
        out, state = self.hidden(torch.tensor(sequences, dtype=torch.long))
        return self.head(out[:, -1, :]), state

    def pooled_features(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Classifier features: mean, max and last of the top-layer outputs over each sequence."""
        lengths = torch.tensor([len(s) for s in sequences])
        batch = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long)
        for row, seq in enumerate(sequences):
            batch[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        out, _ = self.hidden(batch)  # right padding does not reach earlier positions
        mask = (torch.arange(batch.size(1))[None, :] < lengths[:, None]).unsqueeze(-1)
        mean = (out * mask).sum(1) / lengths[:, None]
        peak = out.masked_fill(~mask, float("-inf")).amax(1)
        last = out[torch.arange(len(sequences)), lengths - 1]
        return torch.cat([mean, peak, last], dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------- classifier


@dataclass
class ClassifierConfig:
    input_dim: int = 1536  # 3 x the LM's hidden size: mean, max and last pooled top-layer outputs
    hidden_dims: list[int] = field(default_factory=lambda: [256])  # MLP hidden layer widths
    num_labels: int = 6  # output classes
    dropout: float = 0.3  # after each hidden layer; training only


class MLPClassifier(nn.Module):
    """Standardized pooled LM features -> (linear, GELU, dropout)* -> linear; softmax over labels."""

    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        # Feature standardization is part of the model so that it travels inside the artifact.
        self.register_buffer("feature_mean", torch.zeros(config.input_dim))
        self.register_buffer("feature_std", torch.ones(config.input_dim))
        layers: list[nn.Module] = []
        width = config.input_dim
        for hidden in config.hidden_dims:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(config.dropout)]
            width = hidden
        layers.append(nn.Linear(width, config.num_labels))
        self.net = nn.Sequential(*layers)

    def forward(
        self, features: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.net((features - self.feature_mean) / self.feature_std)
        loss = F.cross_entropy(logits, targets) if targets is not None else None
        return logits, loss

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
