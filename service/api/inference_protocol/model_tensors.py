"""What each model is as the Open Inference Protocol sees it: its input and output tensors, and how the
engine computes them.

Every model takes `text` (BYTES, one text per row). Its language model gives `next_char_probs` (FP32,
[rows, vocabulary]: the distribution over the next character after each text, the one /v1/next-token
ranks), `log_likelihood` (FP32, [rows]: the text's natural-log probability, as /v1/score's `logprob`),
`bits_per_char` (FP32, [rows]) and `vocabulary` (BYTES, [vocabulary]: the character of each column).
A model trained with a classifier adds `label` (BYTES, [rows]) and `label_probs` (FP32, [rows, labels],
columns in the order of `labels`, BYTES [labels]). A request whose input is `text_input` (BYTES, [1]) asks
instead for a generation: its one output, `text_output` (BYTES, [1]), is the generated text."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from service.api.inference_protocol.tensors import Tensor
from service.engine.engine import Engine


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    name: str
    datatype: str
    shape: list[int]  # -1: as many rows as texts
    columns: Callable[[Engine], list[str]] | None = None  # the labels of the last dimension (classification)


TEXT_INPUT = "text"
GENERATE_INPUT, GENERATE_OUTPUT = "text_input", "text_output"  # a generation (see inference_protocol.infer)


def _vocabulary(engine: Engine) -> list[str]:
    return list(engine.vocab.chars)


def _labels(engine: Engine) -> list[str]:
    return list(engine.labels or [])


def output_specs(engine: Engine) -> list[OutputSpec]:
    vocab = engine.vocab.size
    specs = [
        OutputSpec(name="next_char_probs", datatype="FP32", shape=[-1, vocab], columns=_vocabulary),
        OutputSpec(name="log_likelihood", datatype="FP32", shape=[-1]),
        OutputSpec(name="bits_per_char", datatype="FP32", shape=[-1]),
        OutputSpec(name="vocabulary", datatype="BYTES", shape=[vocab]),
    ]
    if engine.classifier is not None:
        labels = len(engine.labels or [])
        specs += [
            OutputSpec(name="label", datatype="BYTES", shape=[-1]),
            OutputSpec(name="label_probs", datatype="FP32", shape=[-1, labels], columns=_labels),
            OutputSpec(name="labels", datatype="BYTES", shape=[labels]),
        ]
    return specs


def metadata(engine: Engine) -> dict[str, Any]:
    """The `inputs` and `outputs` of the model's metadata."""
    outputs = [{"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in output_specs(engine)]
    return {
        "inputs": [
            {"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": GENERATE_INPUT, "datatype": "BYTES", "shape": [1]},
        ],
        "outputs": [*outputs, {"name": GENERATE_OUTPUT, "datatype": "BYTES", "shape": [1]}],
    }


def compute(engine: Engine, texts: list[str], wanted: list[str], deadline: float | None) -> dict[str, Tensor]:
    """The `wanted` outputs for `texts`, each computed once for all of them."""
    rows = len(texts)
    out: dict[str, Tensor] = {}
    if "next_char_probs" in wanted:
        probs: list[float] = []
        for text in texts:
            probs += torch.softmax(engine.next_token_logits(text).double(), dim=-1).tolist()
        out["next_char_probs"] = Tensor(
            name="next_char_probs", datatype="FP32", shape=[rows, engine.vocab.size], data=probs
        )
    if "log_likelihood" in wanted or "bits_per_char" in wanted:
        scores = engine.score(texts, include_tokens=False, deadline=deadline) if rows else []
        out["log_likelihood"] = Tensor(
            name="log_likelihood", datatype="FP32", shape=[rows], data=[s.logprob for s in scores]
        )
        out["bits_per_char"] = Tensor(
            name="bits_per_char", datatype="FP32", shape=[rows], data=[s.bits_per_char for s in scores]
        )
    if "vocabulary" in wanted:
        out["vocabulary"] = Tensor(
            name="vocabulary", datatype="BYTES", shape=[engine.vocab.size], data=_vocabulary(engine)
        )
    if engine.classifier is not None and {"label", "label_probs"} & set(wanted):
        found = engine.classify(texts) if rows else []
        labels = _labels(engine)
        out["label"] = Tensor(name="label", datatype="BYTES", shape=[rows], data=[c.label for c in found])
        values = [c.probabilities[label] for c in found for label in labels]
        out["label_probs"] = Tensor(name="label_probs", datatype="FP32", shape=[rows, len(labels)], data=values)
    if engine.classifier is not None and "labels" in wanted:
        out["labels"] = Tensor(name="labels", datatype="BYTES", shape=[len(_labels(engine))], data=_labels(engine))
    for tensor in out.values():
        if tensor.datatype == "FP32" and not all(math.isfinite(v) for v in tensor.data):
            raise ValueError(f"output {tensor.name} is not finite")
    return {name: out[name] for name in wanted}
