"""Passage sampling and the MLP classifier on pooled LM states, with its two baselines."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_union
from tqdm import tqdm

from seqmodels.networks import CharLSTM, ClassifierConfig, MLPClassifier, Vocab


@dataclass
class ClassifierTrainConfig:
    min_chars: int = 200  # shortest sampled passage
    max_chars: int = 1000  # longest sampled passage
    train_per_label: int = 600  # training passages per label, spread evenly over its documents
    eval_per_document: int = 80  # validation and test passages per held-out document
    epochs: int = 200  # upper bound; early stopping on validation loss usually ends sooner
    patience: int = 20  # epochs without a better validation loss before stopping
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.05  # AdamW decay
    batch_size: int = 128  # minibatch of passages
    model: ClassifierConfig = field(default_factory=ClassifierConfig)


@dataclass
class Passages:
    texts: list[str]
    labels: list[str]


def sample_passages(
    texts: list[tuple[str, str]], count_of: list[int], cfg: ClassifierTrainConfig, seed: int
) -> Passages:
    """Passages of `min_chars` to `max_chars` characters that start and end on line boundaries.

    `texts` holds (label, text) pairs; `count_of[i]` passages are drawn from the i-th.
    A text shorter than `min_chars` is used whole, once.
    """
    rng = random.Random(seed)
    out = Passages([], [])
    for (label, text), count in zip(texts, count_of, strict=True):
        if len(text) <= cfg.min_chars:
            out.texts.append(text)
            out.labels.append(label)
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
    return out


@torch.no_grad()
def lm_features(lm: CharLSTM, vocab: Vocab, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Pooled LM states, reading each text from the start symbol; texts sorted by length to limit padding."""
    lm.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    feats = torch.empty(len(texts), 3 * lm.config.hidden_size)
    for i in tqdm(range(0, len(order), batch_size), desc="features", unit="batch", leave=False):
        rows = order[i : i + batch_size]
        seqs = [[vocab.bos_id, *vocab.encode(texts[r])] for r in rows]
        feats[rows] = lm.pooled_features(seqs)
    return feats


def scores(truth: list[str], predicted: list[str]) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
    }


def train_mlp(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    cfg: ClassifierTrainConfig,
    seed: int,
) -> tuple[MLPClassifier, dict[str, list[float]]]:
    torch.manual_seed(seed)
    cfg.model.input_dim = train_x.size(1)
    model = MLPClassifier(cfg.model)
    model.feature_mean.copy_(train_x.mean(0))
    model.feature_std.copy_(train_x.std(0).clamp_min(1e-4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
    best_loss, best_state, since_best = float("inf"), None, 0
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            rows = order[i : i + cfg.batch_size]
            _, loss = model(train_x[rows], train_y[rows])
            assert loss is not None
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        model.eval()
        with torch.no_grad():
            _, val_loss = model(val_x, val_y)
        assert val_loss is not None
        history["train_loss"].append(total / len(train_x))
        history["val_loss"].append(float(val_loss))
        if float(val_loss) < best_loss:
            best_loss, since_best = float(val_loss), 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return model, history


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
