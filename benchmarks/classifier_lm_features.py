"""Would the LM's reading of a passage lift the genre classifier? Measured on the training run's split.

    python -m benchmarks.classifier_lm_features [--artifacts artifacts]

The issue allows the classifier LSTM-state features, provided that the LM never trained on the plays
the classifier is tested on. The committed LM trained on the split's 24 training plays only, so on
that split (the classifier's single split: passages of the same 24 training plays, early stopping on
the 7 validation plays, tested on the 7 test plays) its states are fair features. Cross-validation
would need one LM per fold (each at least as long to train as the served one), which the default run's
70-minute budget has no room for; hence one split here, beside the baseline on the same passages.

Each passage is read by the LM from its start symbol; its features are the mean of the top layer's
outputs over the passage (`hidden_size` numbers) and its mean surprisal (bits per character), z-scored
with the training passages' statistics. Rows: the served MLP (n-grams), an MLP on the LM features
alone, and an MLP whose first layer reads both (the n-gram `EmbeddingBag` plus a linear map of the
LM features, summed before the GELU), each with the training settings of the served MLP.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn

from benchmarks.common import RESULTS, write_report
from seqmodels.artifacts import load_artifacts
from seqmodels.networks import CharLSTM, ClassifierConfig, MLPClassifier, NgramBatch, Vocab
from training.classifier import (
    BestEpoch,
    ClassifierTrainConfig,
    Passages,
    balanced_weights,
    encode_passages,
    fit_and_predict_mlp,
    inverse_document_frequency,
    scores,
    tfidf_baseline,
)
from training.corpus import load_plays
from training.run import passage_sampler, split_or_chunk


@torch.inference_mode()
def lm_features(lm: CharLSTM, vocab: Vocab, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(N, hidden_size + 1): mean top-layer output after each character, and mean surprisal in bits."""
    lm.eval()
    out = torch.empty(len(texts), lm.config.hidden_size + 1)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
    for begin in range(0, len(order), batch_size):
        rows = order[begin : begin + batch_size]
        encoded = [vocab.encode(texts[r]) for r in rows]
        longest = max(len(e) for e in encoded)
        # Padding goes after each text, so it cannot change what the LSTM computed before it.
        ids = torch.zeros(len(rows), longest + 1, dtype=torch.long)
        ids[:, 0] = vocab.bos_id
        mask = torch.zeros(len(rows), longest)
        for j, e in enumerate(encoded):
            ids[j, 1 : len(e) + 1] = torch.tensor(e, dtype=torch.long)
            mask[j, : len(e)] = 1
        hidden, _ = lm.hidden(ids)
        logp = F.log_softmax(lm.head(hidden[:, :-1]).float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        lengths = mask.sum(1, keepdim=True)
        out[rows, :-1] = (hidden[:, 1:] * mask[..., None]).sum(1) / lengths
        out[rows, -1] = -(logp * mask).sum(1) / lengths[:, 0] / math.log(2)
    return out


class NgramAndStateMLP(nn.Module):
    """The served MLP with a dense input beside the n-grams: both feed the first layer's pre-activations.
    With `use_ngrams` off the n-gram half is skipped and the dense input stands alone."""

    def __init__(self, config: ClassifierConfig, dense_dim: int, use_ngrams: bool) -> None:
        super().__init__()
        self.mlp = MLPClassifier(config)
        self.dense = nn.Linear(dense_dim, config.hidden_dims[0])
        self.use_ngrams = use_ngrams

    def forward(self, batch: NgramBatch, dense: torch.Tensor) -> torch.Tensor:
        first = self.dense(dense)
        if self.use_ngrams:
            first = first + self.mlp.ngram_layer(batch)
        return self.mlp.net(first)


def fit_and_predict(
    train: Passages,
    val: Passages,
    test: Passages,
    dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    labels: list[str],
    cfg: ClassifierTrainConfig,
    seed: int,
    use_ngrams: bool,
) -> list[str]:
    """`training.classifier.train_mlp`'s recipe (AdamW, class-balanced cross-entropy, the epoch with the
    best validation macro-F1), for the model with a dense input."""
    train_c, y_train, val_c, y_val, test_c = encode_passages(train, val, test, labels, cfg)
    torch.manual_seed(seed)
    model = NgramAndStateMLP(cfg.model, dense[0].size(1), use_ngrams)
    model.mlp.idf.copy_(inverse_document_frequency(train_c, cfg.model.buckets))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    class_weights = balanced_weights(y_train, cfg.model.num_labels)
    generator = torch.Generator().manual_seed(seed)
    passages = [NgramBatch.text_tensors(c) for c in train_c]
    val_batch, test_batch = NgramBatch.of(val_c), NgramBatch.of(test_c)
    best = BestEpoch(patience=cfg.patience)
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train_c), generator=generator).tolist()
        for i in range(0, len(order), cfg.batch_size):
            rows = order[i : i + cfg.batch_size]
            logits = model(NgramBatch.concat([passages[r] for r in rows]), dense[0][rows])
            loss = F.cross_entropy(logits, y_train[rows], weight=class_weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            predicted = model(val_batch, dense[1]).argmax(1).tolist()
        val_f1 = float(f1_score(y_val.tolist(), predicted, average="macro", zero_division=0))
        if best.should_stop(val_f1, model):
            break
    best.restore(model)
    with torch.no_grad():
        return [labels[i] for i in model(test_batch, dense[2]).argmax(1).tolist()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--seed", type=int, default=1234, help="the training run's seed: its split and passages")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    models = load_artifacts(args.artifacts)
    docs, split = split_or_chunk(load_plays(), args.seed)
    if models.manifest["split"] != split.as_json():
        raise SystemExit("the artifacts' LM was trained on another split; pass the seed its run used")
    cfg = ClassifierTrainConfig()
    _, sample = passage_sampler(docs, None, cfg)
    train, val, test = sample(split.train, split.validation, split.test, args.seed)
    labels = sorted(set(train.labels))
    started = time.monotonic()
    features = [lm_features(models.lm, models.vocab, p.texts) for p in (train, val, test)]
    feature_seconds = time.monotonic() - started
    mean, std = features[0].mean(0), features[0].std(0).clamp_min(1e-6)
    train_dense, val_dense, test_dense = ((f - mean) / std for f in features)
    dense = train_dense, val_dense, test_dense
    chars = sum(len(t) for p in (train, val, test) for t in p.texts)
    print(f"LM features of {chars:,} characters in {feature_seconds:.0f} s")
    baseline = tfidf_baseline(train, test, args.seed)
    _, served, _ = fit_and_predict_mlp(train, val, test, labels, cfg, args.seed)
    rows: list[dict[str, Any]] = [
        {"model": "TF-IDF + logistic regression", **scores(test.labels, baseline)},
        {"model": "MLP on n-grams (the served recipe)", **scores(test.labels, served)},
    ]
    for name, use_ngrams in (("MLP on LM features", False), ("MLP on n-grams + LM features", True)):
        predicted = fit_and_predict(train, val, test, dense, labels, cfg, args.seed, use_ngrams)
        rows.append({"model": name, **scores(test.labels, predicted)})
        print(rows[-1], flush=True)
    report = {
        "seed": args.seed,
        "passages": {"train": len(train.texts), "validation": len(val.texts), "test": len(test.texts)},
        "test_documents": split.test,
        "lm_feature_seconds": feature_seconds,
        "lm_feature_characters": chars,
        "rows": rows,
    }
    table = "| model (single split, 7 test plays) | accuracy | macro-F1 |\n|---|---|---|\n" + "".join(
        f"| {r['model']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} |\n" for r in rows
    )
    write_report(args.out, "classifier_lm_features", report, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
