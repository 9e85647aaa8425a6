"""The networks: the character vocabulary, the LSTM language model and the MLP classifier.

Shared by `training` (which fits them) and `service` (which serves them); the artifact
format that stores them is `seqmodels.artifacts`.
"""

from __future__ import annotations

import copy
import math
import re
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

UNKNOWN_CHAR = "\ufffd"  # U+FFFD REPLACEMENT CHARACTER stands for every out-of-vocabulary character
LN2 = math.log(2.0)  # nats per bit: bits per character = -log-probability / characters / LN2
LSTMState = tuple[torch.Tensor, torch.Tensor]
_LSTM_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


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


# --------------------------------------------------------------------------- language model


@dataclass(kw_only=True)
class LMConfig:
    vocab_size: int = 80  # predictable characters, U+FFFD included; the start symbol is one more input
    embed_dim: int = 64  # character embedding width
    hidden_size: int = 512  # LSTM units per layer
    num_layers: int = 2  # stacked LSTM layers
    # Regularization, training only (AWD-LSTM's set).
    # Half the lightest setting of an earlier sweep: validation bpc is still falling when the 48-minute budget
    # ends, so the model underfits rather than overfits (benchmarks/results/lm_dropout.md, docs/experiments.md).
    dropout: float = 0.1  # locked dropout on the top layer's outputs, before the head
    input_dropout: float = 0.025  # locked dropout on the embedded inputs
    hidden_dropout: float = 0.075  # locked dropout between LSTM layers
    weight_dropout: float = 0.1  # DropConnect on the recurrent matrices, one mask per window
    embed_dropout: float = 0.0  # whole characters dropped from the embedding table, one mask per window


@dataclass
class AdaptConfig:
    """Dynamic evaluation (Krause et al. 2018), chosen on validation text by the training run."""

    lr: float = 0.0  # SGD step on each segment's mean cross-entropy (nats); 0 turns adaptation off
    segment_len: int = 100  # characters scored before each step
    decay: float = 0.0  # pull towards the trained weights after each step, as a fraction of the gap


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout with one mask per sequence, shared over time (B, T, C): the same units stay off for the
    whole window, which regularizes a recurrent network where per-step masks mostly add noise."""
    if not training or p <= 0:
        return x
    mask = x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - p).div_(1 - p)
    return x * mask


def bfloat16_units(device: torch.device) -> str | None:
    """The bfloat16 matrix units of `device`, named, or None where it has none (bfloat16 would then be
    emulated, slower than float32): AMX-BF16 or AVX512-BF16 on CPUs, bfloat16 support on GPUs."""
    if device.type == "cuda":
        return "a GPU with bfloat16" if torch.cuda.is_bf16_supported() else None
    units = [
        name
        for name, probe in (("AMX-BF16", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
        if getattr(torch.cpu, probe, lambda: False)()
    ]
    return " and ".join(units) if units and torch.backends.mkldnn.is_available() else None


class CharLSTM(nn.Module):
    """Character embedding -> LSTM -> linear; softmax over the vocabulary.

    In eval mode the forward pass is plain `nn.LSTM`, whose arithmetic the serving kernels reproduce
    (within float32's rounding, or bfloat16's); in training mode each layer runs on its own weights with
    AWD-LSTM's dropouts.
    """

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size + 1, config.embed_dim)  # +1: start symbol
        self.lstm = nn.LSTM(config.embed_dim, config.hidden_size, num_layers=config.num_layers, batch_first=True)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def zero_state(self, batch: int, device: torch.device | str = "cpu") -> LSTMState:
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def hidden(self, idx: torch.Tensor, state: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        """Top-layer outputs (B, T, H) and the final state, from the zero state when `state` is None."""
        if not self.training:
            out, new_state = self.lstm(self.embed(idx), state)
            return out, new_state
        return self._regularized_hidden(idx, state)

    def _regularized_hidden(self, idx: torch.Tensor, state: LSTMState | None) -> tuple[torch.Tensor, LSTMState]:
        cfg = self.config
        table = self.embed.weight
        if cfg.embed_dropout > 0:
            keep = table.new_empty(table.size(0), 1).bernoulli_(1 - cfg.embed_dropout) / (1 - cfg.embed_dropout)
            table = table * keep
        x = locked_dropout(F.embedding(idx, table), cfg.input_dropout, True)
        h0, c0 = state if state is not None else self.zero_state(idx.size(0), idx.device)
        finals_h, finals_c = [], []
        for layer in range(cfg.num_layers):
            w_ih, w_hh, b_ih, b_hh = (getattr(self.lstm, f"{name}_l{layer}") for name in _LSTM_WEIGHTS)
            w_hh = F.dropout(w_hh, cfg.weight_dropout, True)
            hx = (h0[layer : layer + 1].contiguous(), c0[layer : layer + 1].contiguous())
            # The op nn.LSTM itself calls: one layer, no dropout of its own, training, one direction, batch first.
            x, h, c = torch._VF.lstm(x, hx, [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, True, False, True)  # type: ignore[attr-defined]
            finals_h.append(h)
            finals_c.append(c)
            if layer + 1 < cfg.num_layers:
                x = locked_dropout(x, cfg.hidden_dropout, True)
        return x, (torch.cat(finals_h), torch.cat(finals_c))

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        state: LSTMState | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, LSTMState]:
        """Logits (B, T, V) for the character after each input, the mean cross-entropy, and the final state."""
        out, new_state = self.hidden(idx, state)
        logits = self.head(locked_dropout(out, self.config.dropout, self.training))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss, new_state

    def adapted_logprobs(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        adapt: AdaptConfig,
        deadline: float | None = None,
        autocast: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Dynamic evaluation: the log-probability (nats) of each target, reading `inputs` (1, T) segment by
        segment and, after scoring each segment, taking one SGD step on it.

        Every character is scored before the weights have seen it. The steps go to a private copy of
        the weights, thrown away on return, so the model itself never changes. Past `deadline` (a
        `time.monotonic()` value) it raises TimeoutError between segments. `autocast` bfloat16 runs the
        passes under CPU autocast (the weights and their steps stay float32).
        """
        model = copy.deepcopy(self)
        # Training mode with every dropout at 0: the per-layer path, which cuDNN can differentiate
        # (its eval-mode LSTM has no backward), computing what eval mode computes.
        model.config = replace(
            self.config, dropout=0.0, input_dropout=0.0, hidden_dropout=0.0, weight_dropout=0.0, embed_dropout=0.0
        )
        model.train()
        params = [p for p in model.parameters()]
        anchors = [p.detach().clone() for p in params] if adapt.decay > 0 else []
        state: LSTMState | None = None
        out = torch.empty(targets.size(1), dtype=torch.float64)
        # A rate of 0 (the tuning's baseline trial) takes no steps, so it needs no gradients either.
        with torch.set_grad_enabled(adapt.lr > 0):
            for begin in range(0, inputs.size(1), adapt.segment_len):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"adaptive scoring stopped after {begin} of {inputs.size(1)} characters")
                end = min(begin + adapt.segment_len, inputs.size(1))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == torch.bfloat16):
                    logits, _, state = model(inputs[:, begin:end], state=state)
                logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, begin:end, None])[0, :, 0]
                out[begin:end] = logp.detach().double()
                state = (state[0].detach(), state[1].detach())
                if end == inputs.size(1) or adapt.lr == 0:
                    continue
                grads = torch.autograd.grad(-logp.mean(), params)
                with torch.no_grad():
                    for p, g in zip(params, grads, strict=True):
                        p.sub_(g, alpha=adapt.lr)
                    for p, anchor in zip(params, anchors, strict=False):  # empty without decay
                        p.add_(anchor - p, alpha=adapt.decay)
        return out

    def step(self, ids: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        """One recurrent step for a batch of single characters: logits (B, V) and the new state."""
        logits, _, new_state = self(ids.unsqueeze(1), state=state)
        return logits[:, -1, :], new_state

    def prefill(
        self, sequences: Sequence[Sequence[int]], state: LSTMState | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        """Run input sequences of one length (start symbol first) from `state`, or the zero state: the
        logits after the last input (B, V) and the state there."""
        if len({len(s) for s in sequences}) != 1:
            raise ValueError("prefill takes sequences of one length")
        out, state = self.hidden(torch.tensor(sequences, dtype=torch.long), state)
        return self.head(out[:, -1, :]), state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------- classifier


@dataclass(kw_only=True)
class ClassifierConfig:
    buckets: int = 32768  # hashed n-gram features; collisions cost little at this size (see the model card)
    word_ngrams: int = 2  # word n-grams of 1 to this many words
    char_ngrams: list[int] = field(default_factory=lambda: [2, 5])  # character n-grams in words: shortest, longest
    hidden_dims: list[int] = field(default_factory=lambda: [128])  # MLP hidden widths; the first reads the n-grams
    num_labels: int = 6  # output classes
    dropout: float = 0.5  # after each hidden layer; training only
    feature_dropout: float = 0.2  # share of a passage's n-grams dropped; training only


_WORD = re.compile(r"\w+(?:'\w+)*")


def ngram_counts(text: str, config: ClassifierConfig) -> Counter[int]:
    """Hashed n-gram counts of a text: lower-cased words and word n-grams, and character n-grams of
    each word padded with spaces (so prefixes and suffixes are their own features).

    CRC-32 is the hash: stable across processes and Python versions, unlike `hash()`.
    """
    words = _WORD.findall(text.lower())
    grams: list[str] = []
    for n in range(1, config.word_ngrams + 1):
        grams += ["w:" + " ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    low, high = config.char_ngrams
    for word in words:
        padded = f" {word} "
        for n in range(low, min(high, len(padded)) + 1):
            grams += ["c:" + padded[i : i + n] for i in range(len(padded) - n + 1)]
    return Counter(zlib.crc32(g.encode("utf-8")) % config.buckets for g in grams)


@dataclass(kw_only=True)
class NgramBatch:
    """Sparse n-gram counts of a batch of texts: entry j is bucket `index[j]` of text `row[j]`."""

    index: torch.Tensor  # (N,) long
    count: torch.Tensor  # (N,) float
    row: torch.Tensor  # (N,) long, non-decreasing
    size: int  # texts in the batch

    @classmethod
    def of(cls, counts: Sequence[Counter[int]]) -> NgramBatch:
        index = [b for c in counts for b in c]
        count = [float(n) for c in counts for n in c.values()]
        row = [r for r, c in enumerate(counts) for _ in range(len(c))]
        return cls(
            index=torch.tensor(index, dtype=torch.long),
            count=torch.tensor(count),
            row=torch.tensor(row, dtype=torch.long),
            size=len(counts),
        )

    @staticmethod
    def text_tensors(counts: Counter[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One text's (index, count) tensors, in the order `of` lays them out."""
        return torch.tensor(list(counts), dtype=torch.long), torch.tensor([float(n) for n in counts.values()])

    @classmethod
    def concat(cls, texts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> NgramBatch:
        """The batch `of` builds, from texts already converted by `text_tensors`: training converts each
        passage once instead of once per epoch."""
        lengths = torch.tensor([len(index) for index, _ in texts])
        return cls(
            index=torch.cat([index for index, _ in texts]),
            count=torch.cat([count for _, count in texts]),
            row=torch.repeat_interleave(torch.arange(len(texts)), lengths),
            size=len(texts),
        )


class MLPClassifier(nn.Module):
    """Hashed word and character n-grams, TF-IDF weighted and L2-normalized -> (linear, GELU, dropout)*
    -> linear; softmax over labels. The first linear layer reads the sparse n-grams directly
    (an `EmbeddingBag` sum), so a passage costs its n-grams, not the bucket count."""

    idf: torch.Tensor

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        # Inverse document frequencies are part of the model so that they travel inside the artifact.
        self.register_buffer("idf", torch.ones(config.buckets))
        first, *rest = config.hidden_dims
        self.ngrams = nn.EmbeddingBag(config.buckets, first, mode="sum")
        self.ngram_bias = nn.Parameter(torch.zeros(first))
        layers: list[nn.Module] = [nn.GELU(), nn.Dropout(config.dropout)]
        width = first
        for hidden in rest:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(config.dropout)]
            width = hidden
        layers.append(nn.Linear(width, config.num_labels))
        self.net = nn.Sequential(*layers)

    def featurize(self, texts: Sequence[str]) -> NgramBatch:
        return NgramBatch.of([ngram_counts(t, self.config) for t in texts])

    def forward(
        self, batch: NgramBatch, targets: torch.Tensor | None = None, class_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.net(self.ngram_layer(batch))
        loss = F.cross_entropy(logits, targets, weight=class_weights) if targets is not None else None
        return logits, loss

    def ngram_layer(self, batch: NgramBatch) -> torch.Tensor:
        """The first layer's pre-activations (B, hidden_dims[0]), read straight from the sparse n-grams."""
        index, row = batch.index, batch.row
        weight = (1 + batch.count.log()) * self.idf[index]  # sublinear term frequency x IDF
        if self.training and self.config.feature_dropout > 0:
            weight = weight * torch.empty_like(weight).bernoulli_(1 - self.config.feature_dropout)
        norm = torch.zeros(batch.size).index_add_(0, row, weight * weight).sqrt().clamp_min(1e-12)
        offsets = torch.zeros(batch.size, dtype=torch.long)
        offsets[1:] = torch.bincount(row, minlength=batch.size).cumsum(0)[:-1]
        return self.ngrams(index, offsets, per_sample_weights=weight / norm[row]) + self.ngram_bias

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
