"""The language model's held-out figures: bits per character on the test and validation texts, PPMd's on
the same characters, and dynamic evaluation tuned on the validation documents and measured on the test
ones; and the corpus as a run splits it, which they are measured on."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from seqmodels.networks import AdaptConfig, CharLSTM, Vocab
from training.corpus import (
    Document,
    Split,
)
from training.lm import LMHistory, adapted_bpc, evaluate_bpc, tune_adaptation
from training.report import ppmd_conditional_bpc

FEATURE_RULE = (
    "lower-cased words (\\w+ with inner apostrophes), word 1-2-grams and space-padded character 2-5-grams "
    "of each word, CRC-32 hashed into the buckets; (1 + log count) x IDF, L2-normalized per text"
)
EVAL_SEGMENT = 8192

EVAL_SEGMENT = 8192  # characters per scoring segment (the state carries over between them)


@dataclass(kw_only=True)
class Corpus:
    """The run's data: the LM's documents split by whole documents, the texts cut from them, and the
    classifier's labelled documents (None: the plays' genres) with their split."""

    docs: list[Document]
    description: str
    split: Split
    train_text: str
    val_text: str
    test_text: str  # the characters every held-out figure is measured on
    labelled: list[Document] | None
    clf_split: Split


def evaluate_lm(
    lm: CharLSTM,
    vocab: Vocab,
    corpus: Corpus,
    args: argparse.Namespace,
    device: torch.device,
    trained: dict[str, Any],
) -> tuple[dict[str, Any], AdaptConfig]:
    """The held-out figures: bits per character on the test and validation texts, PPMd's on the same test
    characters, and dynamic evaluation tuned on the validation documents and measured on the test ones;
    with the figures of the training run (`trained`) among them, where metrics.json has always had them."""
    print("evaluating the LM on the held-out documents ...")
    encode = lambda text: torch.tensor(vocab.encode(text), dtype=torch.long)  # noqa: E731
    test_bpc = evaluate_bpc(lm, encode(corpus.test_text), vocab.bos_id, EVAL_SEGMENT)
    val_bpc = evaluate_bpc(lm, encode(corpus.val_text), vocab.bos_id, EVAL_SEGMENT)
    print("PPMd baseline ...")
    ppmd = ppmd_conditional_bpc(corpus.train_text, corpus.test_text)
    print(f"test: LSTM {test_bpc:.3f} bpc, PPMd {ppmd['bpc']:.3f} bpc (order {ppmd['order']})")
    by_name = {d.name: d for d in corpus.docs}
    print("tuning dynamic evaluation on the validation documents ...")
    adapt_started = time.monotonic()
    tuning = [encode(by_name[n].text[: args.adapt_val_chars]) for n in corpus.split.validation]
    adapt, adapt_trials = tune_adaptation(lm, tuning, vocab.bos_id, list(args.adapt_lrs), list(args.adapt_segments))
    # Each test document read whole, on its own: together, the same characters as test_text.
    test_documents = [encode(by_name[n].text) for n in corpus.split.test]
    adapt_seconds = time.monotonic() - adapt_started
    test_started = time.monotonic()
    adaptive_bpc = adapted_bpc(lm, test_documents, vocab.bos_id, adapt) if adapt.lr > 0 else None
    adaptive_seconds = time.monotonic() - test_started
    test_chars = sum(len(ids) for ids in test_documents)
    if adaptive_bpc is not None:
        print(
            f"test with dynamic evaluation: {adaptive_bpc:.3f} bpc ({adaptive_seconds:.0f} s for {test_chars:,} chars)"
        )
    figures = {
        "test_bpc": test_bpc,
        "val_bpc": val_bpc,
        "test_chars": len(corpus.test_text),
        "val_chars": len(corpus.val_text),
        "eval_segment_chars": EVAL_SEGMENT,
        "ppmd": ppmd,
        **trained,
        "beats_ppmd_by_percent": 100 * (1 - test_bpc / ppmd["bpc"]),
        "ratio_to_ppmd": test_bpc / ppmd["bpc"],
        "adaptive": {
            "test_bpc": adaptive_bpc,
            "ratio_to_ppmd": None if adaptive_bpc is None else adaptive_bpc / ppmd["bpc"],
            "config": asdict(adapt),
            "scoring": "each test play read whole from the start symbol, on a fresh copy of the weights, "
            "one SGD step after each segment is scored",
            "validation_trials": adapt_trials,
            "tuning_seconds": adapt_seconds,
            "test_seconds": adaptive_seconds,
            "test_chars": test_chars,
            "device": str(device),
        },
    }
    return figures, adapt


def training_figures(lm: CharLSTM, vocab: Vocab, history: LMHistory) -> dict[str, Any]:
    return {
        "vocab_size": vocab.size,
        "parameters": lm.num_parameters(),
        "steps": history.steps[-1] if history.steps else 0,
        "best_step": history.best_step,
        "best_val_bpc_during_training": history.best_val_bpc,
        "stopped_by": history.stopped_by,
    }
