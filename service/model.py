"""The networks and the artifact format, shared by `training` and `service`.

Everything a model needs at inference time lives inside its artifact folder:
weights in safetensors, and a JSON config holding the architecture, the
vocabulary or the labels, and the text normalization rules. Nothing is pickled.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LM_DIR = "lm"
CLASSIFIER_DIR = "classifier"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

UNKNOWN_CHAR = "\ufffd"  # U+FFFD REPLACEMENT CHARACTER stands for every out-of-vocabulary character
LSTMState = tuple[torch.Tensor, torch.Tensor]


class ArtifactError(Exception):
    """An artifact folder that is missing, malformed, of another format version, or tampered with."""


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
            raise ArtifactError("vocabulary must start with U+FFFD and hold distinct characters")
        if any(len(c) != 1 for c in self.chars):
            raise ArtifactError("every vocabulary entry must be a single character")
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


class PackedLinear:
    """`x @ weight.T + bias` for an inference-only weight, prepacked once for oneDNN.

    On this project's CPUs (AMD Zen), MKL's sgemm, which `torch.addmm` calls, costs about k
    times as much for k rows as for one up to a few rows, so batching sequences would save
    nothing. oneDNN's matmul on a weight reordered to its blocked layout costs the same for
    1 to 4 rows and a fifth as much per row at 32, and each row's result does not depend on
    the other rows. The two oneDNN ops are internal to PyTorch (its compiler uses them), so a
    build without them, or one whose result disagrees with `addmm` on a probe, gets `addmm`.
    """

    BATCH_HINT = 32  # rows oneDNN picks its blocking for; 8 to 64 measured alike, 1 was 2-3x slower above 1 row

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> None:
        """`weight` (out, in) and `bias` (out,) in float32; `dtype` is that of the matmul: float32, or
        bfloat16 for half the weight memory traffic (the input is rounded to it, the result is float32)."""
        self.dtype = dtype
        weight = weight.detach().to(dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.transposed = weight.t().contiguous()  # for addmm, the fallback
        self.packed: torch.Tensor | None = None
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, self.BATCH_HINT)
            probe = torch.linspace(-1, 1, 3 * weight.size(1)).reshape(3, -1).to(dtype)
            got = torch.ops.mkldnn._linear_pointwise(probe, packed, self.bias, "none", [], "")
            if torch.allclose(got.float(), self._addmm(probe).float(), rtol=1e-2, atol=1e-3):
                self.packed = packed
                self.transposed = torch.empty(0)  # one copy of the weight is enough
        except (AttributeError, RuntimeError, NotImplementedError):
            pass

    @property
    def uses_onednn(self) -> bool:
        return self.packed is not None

    def _addmm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mm(x, self.transposed) if self.bias is None else torch.addmm(self.bias, x, self.transposed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in) float32 -> (B, out) float32."""
        x = x.to(self.dtype)
        if self.packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        else:
            out = self._addmm(x)
        return out.float()


class FusedStep:
    """Inference-only single step of a trained CharLSTM, for decoding a batch one character at a time.

    `nn.LSTM` called on one time step re-checks its weights, projects the input with its own matmul
    and allocates every intermediate. Here the first layer's input projection (embedding x W_ih, plus
    both biases) is a precomputed table indexed by character, every layer costs one prepacked
    matmul (`PackedLinear`), and the gate nonlinearities and the cell update run in place on the
    batch's state.
    """

    def __init__(self, lm: CharLSTM, dtype: torch.dtype = torch.float32) -> None:
        """`dtype` is that of the matmul weights (see `PackedLinear`); the state, the gates and the
        input table stay float32 either way."""
        self.lm = lm
        self.hidden_size = size = lm.config.hidden_size
        self.dtype = dtype
        weights: dict[str, torch.Tensor] = dict(lm.lstm.named_parameters())
        # PyTorch stacks the gates as input, forget, cell, output; here they are input, forget,
        # output, cell, so that one sigmoid covers the first three.
        gate_order = torch.cat(
            [torch.arange(0, 2 * size), torch.arange(3 * size, 4 * size), torch.arange(2 * size, 3 * size)]
        )

        def w(name: str) -> torch.Tensor:
            return weights[name][gate_order]

        def bias(layer: int) -> torch.Tensor:
            return w(f"bias_ih_l{layer}") + w(f"bias_hh_l{layer}")

        with torch.no_grad():
            self.input_table = torch.addmm(bias(0), lm.embed.weight, w("weight_ih_l0").t()).contiguous()
            self.recurrent0 = PackedLinear(w("weight_hh_l0"), None, dtype)
            self.upper: list[PackedLinear] = []  # per layer >= 1: [x, h] -> gates, with both biases
            for layer in range(1, lm.config.num_layers):
                stacked = torch.cat([w(f"weight_ih_l{layer}"), w(f"weight_hh_l{layer}")], dim=1)
                self.upper.append(PackedLinear(stacked, bias(layer), dtype))
            self.head = PackedLinear(lm.head.weight, lm.head.bias, dtype)
        # Prompt encoding calls oneDNN's LSTM layer (what nn.LSTM calls on this CPU) on weights
        # reordered for it once, here: nn.LSTM reorders them on every call, which costs as much as
        # 30 to 50 time steps. The result is the same to the bit.
        self.rnn_layers: list[tuple[torch.Tensor, ...]] | None = None
        try:
            layers = []
            for layer in range(lm.config.num_layers):
                w_ih, w_hh = (weights[f"weight_{kind}_l{layer}"].detach() for kind in ("ih", "hh"))
                packed = torch.ops.mkldnn._reorder_mkldnn_rnn_layer_weight(w_ih, w_hh, size, False, True, False)
                biases = (weights[f"bias_{kind}_l{layer}"].detach() for kind in ("ih", "hh"))
                layers.append((*packed, *biases))
            self.rnn_layers = layers
            probe = [[1, 2, 3], [2]]
            with torch.inference_mode():
                got, expected = self.prefill(probe)[0], torch.cat([lm.prefill([s])[0] for s in probe])
            if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
                self.rnn_layers = None
        except (AttributeError, RuntimeError, NotImplementedError):
            self.rnn_layers = None

    PREFILL_CHUNK = 256  # time steps per oneDNN call at most; bounds the memory that long prompts take

    def _cell(self, gates: torch.Tensor, c: torch.Tensor, h: torch.Tensor) -> None:
        """Gates in the order input, forget, output, cell; c and h (B, H) are updated in place."""
        size = self.hidden_size
        gates[:, : 3 * size].sigmoid_()
        gates[:, 3 * size :].tanh_()
        c.mul_(gates[:, size : 2 * size]).addcmul_(gates[:, :size], gates[:, 3 * size :])
        torch.tanh(c, out=h)
        h.mul_(gates[:, 2 * size : 3 * size])

    def __call__(self, ids: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Feed characters `ids` (B,) to states h, c (layers, B, H), updated in place; returns logits (B, V)."""
        gates = self.recurrent0(h[0]).add_(self.input_table[ids])
        self._cell(gates, c[0], h[0])
        for layer, affine in enumerate(self.upper, start=1):
            gates = affine(torch.cat([h[layer - 1], h[layer]], dim=1))
            self._cell(gates, c[layer], h[layer])
        return self.head(h[-1])

    def prefill(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, LSTMState]:
        """Run each input sequence (start symbol first) from the zero state: the logits after its last
        input (B, V) and the state there (layers, B, H), rows in the order given.

        Sequences of different lengths are aligned at their ends: sorted longest first, a row joins
        at the step where its sequence starts, so the rows running over any stretch of steps are a
        prefix of the batch, and each stretch is one oneDNN call per layer with no padding computed.
        """
        if self.rnn_layers is None:  # no oneDNN: nn.LSTM, once per group of one length
            return self._prefill_by_length(sequences)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        lengths = [len(sequences[i]) for i in order]
        steps, rows, size = lengths[0], len(order), self.hidden_size
        ids = torch.zeros(steps, rows, dtype=torch.long)
        for row, source in enumerate(order):
            ids[steps - lengths[row] :, row] = torch.tensor(sequences[source], dtype=torch.long)
        inputs = self.lm.embed(ids)  # (T, B, E), time first as oneDNN takes it
        layers = len(self.rnn_layers)
        h, c = torch.zeros(layers, rows, size), torch.zeros(layers, rows, size)
        # Not reversed, no packed batch sizes, mode 2 (LSTM), with biases, one direction, time first, inference.
        flags: tuple[Any, ...] = (False, [], 2, size, layers, True, False, False, False)
        bounds = [*sorted({steps - n for n in lengths} | set(range(0, steps, self.PREFILL_CHUNK))), steps]
        for begin, end in itertools.pairwise(bounds):
            k = sum(1 for n in lengths if steps - n <= begin)  # rows that have started by `begin`
            x = inputs[begin:end, :k].contiguous()
            for layer, weights in enumerate(self.rnn_layers):
                x, h[layer, :k], c[layer, :k], _ = torch.ops.aten.mkldnn_rnn_layer(
                    x, *weights, h[layer, :k], c[layer, :k], *flags
                )
        logits = self.lm.head(h[-1])
        back = torch.tensor(order).argsort()
        return logits[back], (h[:, back], c[:, back])

    def _prefill_by_length(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, LSTMState]:
        groups: dict[int, list[int]] = {}
        for i, sequence in enumerate(sequences):
            groups.setdefault(len(sequence), []).append(i)
        layers, size = self.lm.config.num_layers, self.hidden_size
        logits = torch.empty(len(sequences), self.lm.config.vocab_size)
        h, c = torch.empty(layers, len(sequences), size), torch.empty(layers, len(sequences), size)
        for members in groups.values():
            index = torch.tensor(members)
            logits[index], (h[:, index], c[:, index]) = self.lm.prefill([sequences[i] for i in members])
        return logits, (h, c)


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


# --------------------------------------------------------------------------- artifact format


@dataclass
class LoadedModels:
    lm: CharLSTM
    vocab: Vocab
    classifier: MLPClassifier
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


def lm_config_json(lm: CharLSTM, vocab: Vocab, min_count: int) -> dict[str, Any]:
    return {
        "kind": "char-lstm-lm",
        "architecture": asdict(lm.config),
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
    classifier: MLPClassifier,
    classifier_config: dict[str, Any],
    manifest_fields: dict[str, Any],
    extra_files: dict[str, bytes],
) -> Path:
    """Write a complete artifact set into a temporary sibling folder, then swap it into place.

    The old folder stays untouched until the final swap, so an interrupted run leaves it
    as it was. On Linux the swap is one atomic renameat2(RENAME_EXCHANGE).
    """
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the served folder must be readable by the service user
    try:
        _write_model(staging / LM_DIR, lm, lm_config)
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
            f"{path}: format_version {manifest.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    if not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path}: no 'files' table of SHA-256 hashes")
    return manifest


def verify_artifacts(artifacts_dir: Path) -> dict[str, Any]:
    """Check the format version and every recorded SHA-256; return the manifest."""
    manifest = read_manifest(artifacts_dir)
    required = {f"{d}/{f}" for d in (LM_DIR, CLASSIFIER_DIR) for f in (CONFIG_FILE, WEIGHTS_FILE)}
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


def load_artifacts(artifacts_dir: Path | str) -> LoadedModels:
    """Verify and load both models in eval mode. Raises ArtifactError naming what is wrong."""
    artifacts_dir = Path(artifacts_dir)
    manifest = verify_artifacts(artifacts_dir)
    lm_json = _read_config(artifacts_dir / LM_DIR / CONFIG_FILE)
    clf_json = _read_config(artifacts_dir / CLASSIFIER_DIR / CONFIG_FILE)
    try:
        vocab = Vocab(tuple(lm_json["vocabulary"]))
        lm = CharLSTM(LMConfig(**lm_json["architecture"]))
        labels = [str(label) for label in clf_json["labels"]]
        classifier = MLPClassifier(ClassifierConfig(**clf_json["architecture"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{artifacts_dir}: config does not describe a model ({exc!r})") from None
    if vocab.size != lm.config.vocab_size:
        raise ArtifactError(f"{artifacts_dir / LM_DIR / CONFIG_FILE}: vocabulary size disagrees with architecture")
    if len(labels) != classifier.config.num_labels:
        raise ArtifactError(f"{artifacts_dir / CLASSIFIER_DIR / CONFIG_FILE}: label count disagrees with architecture")
    _load_weights(lm, artifacts_dir / LM_DIR / WEIGHTS_FILE)
    _load_weights(classifier, artifacts_dir / CLASSIFIER_DIR / WEIGHTS_FILE)
    lm.eval()
    classifier.eval()
    return LoadedModels(
        lm=lm,
        vocab=vocab,
        classifier=classifier,
        labels=labels,
        manifest=manifest,
        digest=sha256_file(artifacts_dir / MANIFEST),
    )
