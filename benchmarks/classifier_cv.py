"""Grouped cross-validation of classifier variants on the default corpus, beside the same baselines.

    python -m benchmarks.classifier_cv [--variants NAME ...]

Each variant changes the MLP's training or feature settings; every row uses the same folds and passages
(the training run's defaults, seed 1234), so the rows compare like with like. The variants run are
merged into benchmarks/results/classifier_cv.json and .md (a row measured before and not run again stays).

"line shapes" tests whether verse and prose can be told apart: besides the n-grams, each passage
gets a token per line for its first letter's case (verse lines start with a capital, wrapped prose
mostly does not), its last character and its length (in steps of 8 characters), and one per speech
for its number of lines.

"5-seed ensemble" averages the softmax of five MLPs that differ only in their seed. "play-adversarial"
adds a head that predicts each training passage's play from the first layer through a gradient
reversal (Ganin and Lempitsky 2015), pushing that layer away from features that tell a genre's plays
apart, since the test plays are new. Rows other than the default were first measured with 600
training passages a genre, the default then, and keep that setting.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import RESULTS, write_report
from seqmodels.networks import ClassifierConfig, MLPClassifier, NgramBatch, ngram_counts
from training import classifier
from training.classifier import ClassifierTrainConfig, Passages, cross_validate, fit_and_predict_mlp
from training.corpus import load_plays
from training.run import passage_sampler


def line_shapes(text: str) -> list[str]:
    tokens = []
    for speech in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in speech.split("\n") if line.strip()]
        if lines:
            tokens.append(f"speech-lines:{min(len(lines), 10)}")
        for line in lines:
            letter = re.search(r"[A-Za-z]", line)
            if letter:
                tokens.append("starts:" + ("upper" if letter.group().isupper() else "lower"))
            tokens.append("ends:" + (line[-1] if not line[-1].isalnum() else "letter"))
            tokens.append(f"length:{min(len(line) // 8, 9)}")
    return tokens


def ngrams_and_line_shapes(text: str, config: ClassifierConfig) -> Counter[int]:
    counts = ngram_counts(text, config)
    counts.update(zlib.crc32(("s:" + t).encode()) % config.buckets for t in line_shapes(text))
    return counts


FEATURIZERS: dict[str, Callable[[str, ClassifierConfig], Counter[int]]] = {"line shapes": ngrams_and_line_shapes}

ENSEMBLE_SIZE = 5
ADVERSARY_STRENGTH = 0.3  # scale of the reversed gradient


def fit_ensemble(
    train: Passages, val: Passages, test: Passages, labels: list[str], cfg: ClassifierTrainConfig, seed: int
) -> tuple[MLPClassifier, list[str], dict[str, list[float]]]:
    train_c, y_train, val_c, y_val, test_c = classifier.encode_passages(train, val, test, labels, cfg)
    probabilities = []
    for member in range(ENSEMBLE_SIZE):
        model, history = classifier.train_mlp(train_c, y_train, val_c, y_val, cfg, seed + 1000 * member)
        probabilities.append(classifier.predict(model, NgramBatch.of(test_c)).softmax(1))
    predicted = [labels[i] for i in torch.stack(probabilities).mean(0).argmax(1).tolist()]
    return model, predicted, history


class GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.strength * grad, None


class PlayAdversary(nn.Module):
    play_of_passage: torch.Tensor

    def __init__(self, width: int, play_of_passage: list[int]) -> None:
        super().__init__()
        self.register_buffer("play_of_passage", torch.tensor(play_of_passage))
        self.head = nn.Sequential(nn.Linear(width, 64), nn.GELU(), nn.Linear(64, max(play_of_passage) + 1))

    def forward(self, first_layer: torch.Tensor, rows: list[int]) -> torch.Tensor:
        reversed_features = GradientReversal.apply(F.gelu(first_layer), ADVERSARY_STRENGTH)
        return F.cross_entropy(self.head(reversed_features), self.play_of_passage[rows])


def fit_with_adversary(
    train: Passages, val: Passages, test: Passages, labels: list[str], cfg: ClassifierTrainConfig, seed: int
) -> tuple[MLPClassifier, list[str], dict[str, list[float]]]:
    torch.manual_seed(seed)  # the adversary's initial weights
    adversary = PlayAdversary(cfg.model.hidden_dims[0], train.sources)
    return fit_and_predict_mlp(train, val, test, labels, cfg, seed, auxiliary=adversary)


FITTERS = {"5-seed ensemble": fit_ensemble, "play-adversarial": fit_with_adversary}
OLD_DEFAULT = {"train_per_label": 600}

VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default (1,500 passages a genre)": ({}, {}),
    "600 passages a genre": (OLD_DEFAULT, {}),
    "3,000 passages a genre": ({"train_per_label": 3000}, {}),
    "line shapes": (OLD_DEFAULT, {}),
    "no feature dropout": (OLD_DEFAULT, {"feature_dropout": 0.0}),
    "2^18 buckets, 64 hidden": (OLD_DEFAULT, {"buckets": 1 << 18, "hidden_dims": [64]}),
    "256 hidden, dropout 0.3": (OLD_DEFAULT, {"hidden_dims": [256], "dropout": 0.3}),
    "words only": (OLD_DEFAULT, {"char_ngrams": [3, 2]}),
    "5-seed ensemble": ({}, {}),
    "play-adversarial": ({}, {}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    docs = load_plays()
    rows = []
    for name in args.variants:
        train_over, model_over = VARIANTS[name]
        cfg = replace(ClassifierTrainConfig(), **train_over, model=replace(ClassifierConfig(), **model_over))
        documents, sample = passage_sampler(docs, None, cfg)
        started = time.monotonic()
        fit = FITTERS.get(name, fit_and_predict_mlp)
        with mock.patch.object(classifier, "ngram_counts", FEATURIZERS.get(name, ngram_counts)):
            cv = cross_validate(documents, sample, sorted(set(documents.values())), cfg, args.seed, fit)
        summary = cv["summary"]
        rows.append(
            {
                "variant": name,
                "mlp_macro_f1": summary["mlp"]["macro_f1"],
                "tfidf_logreg_macro_f1": summary["tfidf_logreg"]["macro_f1"],
                "mlp_minus_best_baseline": cv["mlp_minus_best_baseline_macro_f1"],
                "seconds": time.monotonic() - started,
            }
        )
        print(rows[-1], flush=True)
    previous = args.out / "classifier_cv.json"
    if previous.exists():
        fresh = {r["variant"] for r in rows}
        kept = [r for r in json.loads(previous.read_text())["rows"] if r["variant"] not in fresh]
        order = list(VARIANTS)
        rows = sorted(kept + rows, key=lambda r: order.index(r["variant"]) if r["variant"] in order else len(order))
    table = "| variant | MLP macro-F1 | TF-IDF + LR macro-F1 | MLP - best baseline |\n|---|---|---|---|\n" + "".join(
        f"| {r['variant']} | {r['mlp_macro_f1']['mean']:.3f} ± {r['mlp_macro_f1']['std']:.3f} "
        f"| {r['tfidf_logreg_macro_f1']['mean']:.3f} ± {r['tfidf_logreg_macro_f1']['std']:.3f} "
        f"| {100 * r['mlp_minus_best_baseline']:+.1f} points |\n"
        for r in rows
    )
    write_report(args.out, "classifier_cv", {"seed": args.seed, "rows": rows}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
