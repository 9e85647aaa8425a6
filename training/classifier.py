"""Passage sampling, the n-gram MLP classifier, its baselines, and grouped cross-validation by document."""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_union

from seqmodels.networks import ClassifierConfig, MLPClassifier, NgramBatch, ngram_counts


@dataclass(kw_only=True)
class ClassifierTrainConfig:
    min_chars: int = 200  # shortest sampled passage
    max_chars: int = 1000  # longest sampled passage
    train_per_label: int = 1500  # per label, spread evenly over its documents; 600 scored 2.3 points lower in CV
    eval_per_document: int = 80  # validation and test passages per held-out document
    epochs: int = 60  # upper bound; early stopping on validation macro-F1 usually ends sooner
    patience: int = 8  # epochs without a better validation macro-F1 before stopping
    lr: float = 2e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW decay; dropout does the regularizing
    batch_size: int = 64  # minibatch of passages
    cv_folds: int = 3  # grouped cross-validation folds (every document is a test document exactly once)
    model: ClassifierConfig = field(default_factory=ClassifierConfig)


@dataclass
class Passages:
    texts: list[str]
    labels: list[str]
    sources: list[int] = field(default_factory=list)  # index of the text each passage was drawn from


def sample_passages(
    texts: list[tuple[str, str]], count_of: list[int], cfg: ClassifierTrainConfig, seed: int
) -> Passages:
    """Passages of `min_chars` to `max_chars` characters that start and end on line boundaries.

    `texts` holds (label, text) pairs; `count_of[i]` passages are drawn from the i-th.
    A text shorter than `min_chars` is used whole, once.
    """
    rng = random.Random(seed)
    out = Passages([], [])
    for source, ((label, text), count) in enumerate(zip(texts, count_of, strict=True)):
        if len(text) <= cfg.min_chars:
            out.texts.append(text)
            out.labels.append(label)
            out.sources.append(source)
            continue
        line_starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n" and i + 1 < len(text)]
        for _ in range(count):
            length = rng.randint(cfg.min_chars, cfg.max_chars)
            start = line_starts[rng.randrange(len(line_starts))]
            start = min(start, max(0, len(text) - length))
            passage = text[start : start + length]
            cut = passage.rfind("\n")
            if cut >= cfg.min_chars:
                passage = passage[:cut]
            out.texts.append(passage.strip("\n") or passage)
            out.labels.append(label)
            out.sources.append(source)
    return out


def scores(truth: list[str], predicted: list[str]) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
    }


def inverse_document_frequency(counts: list[Counter[int]], buckets: int) -> torch.Tensor:
    """Smoothed IDF per bucket, as scikit-learn's TfidfVectorizer computes it."""
    df = torch.zeros(buckets)
    for c in counts:
        df[list(c)] += 1
    return torch.log((1 + len(counts)) / (1 + df)) + 1


def balanced_weights(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Class weights inversely proportional to frequency: rare genres count as much as common ones."""
    counts = torch.bincount(labels, minlength=num_labels).float().clamp_min(1)
    return counts.sum() / (num_labels * counts)


def predict(model: MLPClassifier, batch: NgramBatch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        logits, _ = model(batch)
    return logits


@dataclass(kw_only=True)
class BestEpoch:
    """Early stopping on a validation score: keeps the weights of the best epoch so far."""

    patience: int  # epochs without a better score before stopping
    score: float = -math.inf
    state: dict[str, torch.Tensor] | None = None
    since_best: int = 0

    def should_stop(self, score: float, model: torch.nn.Module) -> bool:
        """Records an epoch's score (keeping a copy of the weights if it is the best); True once
        `patience` epochs in a row have not beaten the best."""
        if score > self.score:
            self.score, self.since_best = score, 0
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        self.since_best += 1
        return self.since_best >= self.patience

    def restore(self, model: torch.nn.Module) -> None:
        """Loads the best epoch's weights and puts the model in eval mode."""
        assert self.state is not None, "no epoch was recorded"
        model.load_state_dict(self.state)
        model.eval()


def train_mlp(
    train_counts: list[Counter[int]],
    train_y: torch.Tensor,
    val_counts: list[Counter[int]],
    val_y: torch.Tensor,
    cfg: ClassifierTrainConfig,
    seed: int,
    auxiliary: torch.nn.Module | None = None,
) -> tuple[MLPClassifier, dict[str, list[float]]]:
    """Minibatch AdamW with class-balanced cross-entropy; keeps the epoch with the best validation macro-F1.

    `auxiliary(first_layer, rows)`, where given, adds a loss on the first layer's pre-activations of the
    minibatch's passages (`rows` index the training passages); its parameters train with the model's."""
    torch.manual_seed(seed)
    model = MLPClassifier(cfg.model)
    model.idf.copy_(inverse_document_frequency(train_counts, cfg.model.buckets))
    parameters = [*model.parameters(), *(auxiliary.parameters() if auxiliary is not None else [])]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    class_weights = balanced_weights(train_y, cfg.model.num_labels)
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_macro_f1": []}
    best = BestEpoch(patience=cfg.patience)
    passages = [NgramBatch.text_tensors(c) for c in train_counts]
    val_batch = NgramBatch.of(val_counts)
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train_counts), generator=generator).tolist()
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            rows = order[i : i + cfg.batch_size]
            first_layer = model.ngram_layer(NgramBatch.concat([passages[r] for r in rows]))
            loss = F.cross_entropy(model.net(first_layer), train_y[rows], weight=class_weights)
            if auxiliary is not None:
                loss = loss + auxiliary(first_layer, rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        logits = predict(model, val_batch)
        val_loss = float(F.cross_entropy(logits, val_y))
        val_f1 = float(f1_score(val_y.tolist(), logits.argmax(1).tolist(), average="macro", zero_division=0))
        history["train_loss"].append(total / len(train_counts))
        history["val_loss"].append(val_loss)
        history["val_macro_f1"].append(val_f1)
        if best.should_stop(val_f1, model):
            break
    best.restore(model)
    return model, history


def compared(train: Passages, test: Passages, predicted: list[str], seed: int) -> dict[str, dict[str, float]]:
    """The MLP's predictions scored beside its two baselines, trained and tested on the same passages."""
    return {
        "mlp": scores(test.labels, predicted),
        "tfidf_logreg": scores(test.labels, tfidf_baseline(train, test, seed)),
        "majority": scores(test.labels, majority_baseline(train, test)),
    }


def tfidf_baseline(train: Passages, test: Passages, seed: int) -> list[str]:
    """TF-IDF over word 1-2-grams and character 2-5-grams, then logistic regression."""
    features = make_union(
        TfidfVectorizer(analyzer="word", ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True),
    )
    x_train = features.fit_transform(train.texts)
    clf = LogisticRegression(max_iter=2000, C=10.0, random_state=seed)
    clf.fit(x_train, train.labels)
    return [str(p) for p in clf.predict(features.transform(test.texts))]


def majority_baseline(train: Passages, test: Passages) -> list[str]:
    most_common = max(sorted(set(train.labels)), key=train.labels.count)
    return [most_common] * len(test.texts)


EncodedPassages = tuple[list[Counter[int]], torch.Tensor, list[Counter[int]], torch.Tensor, list[Counter[int]]]


def encode_passages(
    train: Passages, val: Passages, test: Passages, labels: list[str], cfg: ClassifierTrainConfig
) -> EncodedPassages:
    """(training n-grams, training label ids, validation n-grams, validation label ids, test n-grams);
    sets the model's label count."""
    index = {label: i for i, label in enumerate(labels)}
    cfg.model.num_labels = len(labels)
    train_c, val_c, test_c = ([ngram_counts(t, cfg.model) for t in p.texts] for p in (train, val, test))
    y_train, y_val = (torch.tensor([index[y] for y in p.labels], dtype=torch.long) for p in (train, val))
    return train_c, y_train, val_c, y_val, test_c


def fit_and_predict_mlp(
    train: Passages,
    val: Passages,
    test: Passages,
    labels: list[str],
    cfg: ClassifierTrainConfig,
    seed: int,
    auxiliary: torch.nn.Module | None = None,
) -> tuple[MLPClassifier, list[str], dict[str, list[float]]]:
    """Trains the MLP (with `train_mlp`'s `auxiliary` loss, where given) and labels the test passages."""
    train_c, y_train, val_c, y_val, test_c = encode_passages(train, val, test, labels, cfg)
    model, history = train_mlp(train_c, y_train, val_c, y_val, cfg, seed, auxiliary)
    predicted = [labels[i] for i in predict(model, NgramBatch.of(test_c)).argmax(1).tolist()]
    return model, predicted, history


Sampler = Callable[[list[str], list[str], list[str], int], tuple[Passages, Passages, Passages]]
Fitter = Callable[
    [Passages, Passages, Passages, list[str], ClassifierTrainConfig, int],
    tuple[MLPClassifier, list[str], dict[str, list[float]]],
]


def cross_validate(
    documents: dict[str, str],
    sample: Sampler,
    labels: list[str],
    cfg: ClassifierTrainConfig,
    seed: int,
    fit: Fitter = fit_and_predict_mlp,
) -> dict[str, Any]:
    """Grouped k-fold by document: each document is in the test fold exactly once, folds stratified by
    label. In each fold every model trains on the same passages of the training documents and is
    tested on the same passages of the test documents; the MLP stops early on validation documents
    taken from the training side. `documents` maps each document to its label; `sample(train, val,
    test, fold_seed)` draws the passages; `fit` trains the MLP (a benchmark passes its variants' own).
    Returns per-fold and mean/spread figures and the MLP's
    confusion matrix summed over folds."""
    names = sorted(documents)
    folds = StratifiedKFold(n_splits=cfg.cv_folds, shuffle=True, random_state=seed)
    per_fold: list[dict[str, Any]] = []
    confusion = [[0] * len(labels) for _ in labels]
    rng = random.Random(seed)
    split = folds.split(names, [documents[n] for n in names])
    for fold, (train_rows, test_rows) in enumerate(split):
        train_names = [names[i] for i in train_rows]
        by_label: dict[str, list[str]] = {}
        for n in train_names:
            by_label.setdefault(documents[n], []).append(n)
        # One validation document from each label that can spare one (from those with 2 only if none can).
        spare = [group for group in by_label.values() if len(group) >= 3] or [
            group for group in by_label.values() if len(group) >= 2
        ]
        val_names = sorted(rng.choice(sorted(group)) for group in spare)
        fit_names = [n for n in train_names if n not in val_names]
        train, val, test = sample(fit_names, val_names, [names[i] for i in test_rows], seed + fold)
        _, predicted, _ = fit(train, val, test, labels, cfg, seed + fold)
        results: dict[str, Any] = {
            "test_documents": [names[i] for i in test_rows],
            "test_passages": len(test.texts),
            **compared(train, test, predicted, seed),
        }
        print(
            f"fold {fold + 1}/{cfg.cv_folds}: "
            + ", ".join(f"{m} F1 {results[m]['macro_f1']:.3f}" for m in ("mlp", "tfidf_logreg", "majority"))
        )
        per_fold.append(results)
        matrix = confusion_matrix(test.labels, predicted, labels=labels)
        for i, line in enumerate(matrix.tolist()):
            for j, n in enumerate(line):
                confusion[i][j] += n
    summary: dict[str, Any] = {}
    for model in ("mlp", "tfidf_logreg", "majority"):
        summary[model] = {}
        for metric in ("accuracy", "macro_f1"):
            values = [f[model][metric] for f in per_fold]
            summary[model][metric] = {"mean": statistics.fmean(values), "std": statistics.stdev(values)}
    best_baseline = max(summary[m]["macro_f1"]["mean"] for m in ("tfidf_logreg", "majority"))
    return {
        "folds": cfg.cv_folds,
        "grouping": "whole documents (plays); folds stratified by label; same passages for every model",
        "summary": summary,
        "mlp_minus_best_baseline_macro_f1": summary["mlp"]["macro_f1"]["mean"] - best_baseline,
        "per_fold": per_fold,
        "labels": labels,
        "mlp_confusion": confusion,
    }
