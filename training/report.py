"""Held-out figures beside their baselines: the PPMd code length, the curves plot and the model card."""

from __future__ import annotations

import io
from typing import Any

import pyppmd

PPMD_ORDERS = (4, 6, 8, 12)  # the best of these is reported, so that the baseline is not a straw man
PPMD_MEMORY = 1 << 28  # 256 MiB model memory


def ppmd_conditional_bpc(train_text: str, test_text: str) -> dict[str, Any]:
    """Bits per test character of PPMd (variant I) given the training text: C(train + test) - C(train)."""
    train_bytes = train_text.encode("utf-8")
    both = train_bytes + test_text.encode("utf-8")
    by_order = {}
    for order in PPMD_ORDERS:
        c_train = len(pyppmd.compress(train_bytes, max_order=order, mem_size=PPMD_MEMORY))
        c_both = len(pyppmd.compress(both, max_order=order, mem_size=PPMD_MEMORY))
        by_order[order] = 8.0 * (c_both - c_train) / len(test_text)
    best = min(by_order, key=lambda o: by_order[o])
    return {"bpc": by_order[best], "order": best, "mem_bytes": PPMD_MEMORY, "bpc_by_order": by_order}


def curves_png(history: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lm, ax_clf) = plt.subplots(1, 2, figsize=(11, 4))
    steps, train = history["lm"]["steps"], history["lm"]["train_bpc"]
    window = max(1, len(train) // 100)
    smoothed = [
        sum(train[max(0, i - window + 1) : i + 1]) / len(train[max(0, i - window + 1) : i + 1])
        for i in range(len(train))
    ]
    ax_lm.plot(steps, smoothed, label=f"train (mean of {window} steps)")
    ax_lm.plot(history["lm"]["val_steps"], history["lm"]["val_bpc"], "o-", label="validation")
    ax_lm.set(xlabel="optimizer step", ylabel="bits per character", title="Character LSTM")
    ax_lm.legend()
    ax_lm.grid(alpha=0.3)
    epochs = range(1, len(history["classifier"]["train_loss"]) + 1)
    ax_clf.plot(epochs, history["classifier"]["train_loss"], label="train")
    ax_clf.plot(epochs, history["classifier"]["val_loss"], label="validation")
    ax_clf.set(xlabel="epoch", ylabel="cross-entropy (nats)", title="MLP genre classifier")
    ax_clf.legend()
    ax_clf.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def model_card(manifest: dict[str, Any], metrics: dict[str, Any], command: str) -> str:
    lm, clf = metrics["lm"], metrics["classifier"]
    ppmd = lm["ppmd"]
    split = manifest["split"]
    versus = 100 * (lm["test_bpc"] / ppmd["bpc"] - 1)
    arch = manifest["training"]["lm"]["model"]
    rows = "\n".join(
        f"| {name} | {clf[key]['accuracy']:.3f} | {clf[key]['macro_f1']:.3f} |"
        for name, key in (
            ("MLP on pooled LSTM states (ours)", "mlp"),
            ("TF-IDF word+char n-grams + logistic regression", "tfidf_logreg"),
            ("majority class", "majority"),
        )
    )
    return f"""# Model card

Produced by `{command}` on {manifest["created"]}, in {metrics["seconds"]["total"] / 60:.1f} minutes
({manifest["training"]["device"]}). Every figure below is from that run and is repeated in `metrics.json`.

## Data and split
- Corpus: {manifest["corpus"]["description"]} ({manifest["corpus"]["documents"]} documents,
  {manifest["corpus"]["characters"]:,} characters, fingerprint `{manifest["corpus"]["fingerprint"][:16]}`).
- Split by whole documents, stratified by label, seed {manifest["seed"]}: {len(split["train"])} train,
  {len(split["validation"])} validation, {len(split["test"])} test. The same split serves both models.
- Test documents: {", ".join(split["test"])}.

## Character LSTM language model
- {arch["num_layers"]} x {arch["hidden_size"]} LSTM, {arch["embed_dim"]}-wide character embedding,
  {lm["vocab_size"]} symbols, {lm["parameters"]:,} parameters. Characters rarer than
  {manifest["training"]["lm"]["min_count"]} in the training text, and any unseen character, map to U+FFFD.
- Trained {lm["steps"]} steps ({lm["stopped_by"]}), best validation at step {lm["best_step"]}.

| held-out text | LSTM bits/char | PPMd bits/char (order {ppmd["order"]}, given the training text) | LSTM vs PPMd |
|---|---|---|---|
| test ({lm["test_chars"]:,} chars) | {lm["test_bpc"]:.3f} | {ppmd["bpc"]:.3f} | {versus:+.1f} % |
| validation ({lm["val_chars"]:,} chars) | {lm["val_bpc"]:.3f} | | |

The PPMd figure is C(train + test) - C(train) in bits over the test characters, with pyppmd's
variant I, {ppmd["mem_bytes"] >> 20} MiB of model memory, the best of orders
{", ".join(str(o) for o in ppmd["bpc_by_order"])}. The LSTM reads each test segment of
{lm["eval_segment_chars"]:,} characters from its start state.

## Genre classifier
An MLP ({clf["hidden_dims"]} hidden, GELU, dropout) over the mean, max and last top-layer LSTM states
of a passage of {clf["min_chars"]}-{clf["max_chars"]} characters. Speaker lines are removed and
play-specific names are replaced by `NAME`, in training and test passages alike, for all three models.
Test: {clf["test_passages"]} passages from the test documents; labels: {", ".join(clf["labels"])}.

| model | accuracy | macro-F1 |
|---|---|---|
{rows}

## Limits
- Trained on Early Modern English drama only; modern prose gets high bits per character.
- Genre is decided from a few hundred characters of one unseen play per genre, so the test figures
  carry the sampling noise of seven plays.
"""
