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


def png_bytes(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes, without the software tag (so reruns give the same file), closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def curves_png(history: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_classifier = history.get("classifier") is not None
    fig, axes = plt.subplots(1, 2 if with_classifier else 1, figsize=(11 if with_classifier else 5.5, 4), squeeze=False)
    ax_lm = axes[0][0]
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
    if not with_classifier:
        return png_bytes(fig)
    ax_clf = axes[0][1]
    epochs = range(1, len(history["classifier"]["train_loss"]) + 1)
    ax_clf.plot(epochs, history["classifier"]["train_loss"], label="train")
    ax_clf.plot(epochs, history["classifier"]["val_loss"], label="validation")
    ax_clf.set(xlabel="epoch", ylabel="cross-entropy (nats)", title="MLP genre classifier")
    ax_clf.legend()
    ax_clf.grid(alpha=0.3)
    return png_bytes(fig)


def confusion_png(cv: dict[str, Any]) -> bytes:
    """The MLP's confusion matrix summed over the cross-validation folds, rows normalized to recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, counts = cv["labels"], cv["mlp_confusion"]
    recall = [[n / max(1, sum(row)) for n in row] for row in counts]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i, row in enumerate(counts):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if recall[i][j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true genre", title=f"MLP, {cv['folds']}-fold grouped CV (passages)")
    fig.colorbar(image, ax=ax, label="share of the true genre's passages")
    return png_bytes(fig)


def cv_rows(cv: dict[str, Any]) -> str:
    names = (
        ("MLP on hashed n-grams (ours)", "mlp"),
        ("TF-IDF word+char n-grams + logistic regression", "tfidf_logreg"),
        ("majority class", "majority"),
    )
    out = []
    for name, key in names:
        acc, f1 = cv["summary"][key]["accuracy"], cv["summary"][key]["macro_f1"]
        folds = ", ".join(f"{f[key]['macro_f1']:.3f}" for f in cv["per_fold"])
        out.append(f"| {name} | {acc['mean']:.3f} ± {acc['std']:.3f} | {f1['mean']:.3f} ± {f1['std']:.3f} | {folds} |")
    return "\n".join(out)


def classifier_section(clf: dict[str, Any] | None) -> str:
    if clf is None:
        return "No classifier was trained (`--no-classifier`): this artifact serves the language model only.\n"
    rows = "\n".join(
        f"| {name} | {clf[key]['accuracy']:.3f} | {clf[key]['macro_f1']:.3f} |"
        for name, key in (
            ("MLP on hashed n-grams (ours)", "mlp"),
            ("TF-IDF word+char n-grams + logistic regression", "tfidf_logreg"),
            ("majority class", "majority"),
        )
    )
    cv = clf.get("cross_validation")
    cv_section = "Cross-validation was skipped: too few documents per label.\n"
    if cv is not None:
        cv_section = f"""Grouped {cv["folds"]}-fold cross-validation by play (every play is a test play exactly once;
folds stratified by genre; each model trains and is tested on exactly the same passages in each fold). Mean ± standard
deviation over the folds, and each fold's macro-F1:

| model | accuracy | macro-F1 | macro-F1 per fold |
|---|---|---|---|
{cv_rows(cv)}

MLP macro-F1 minus the best baseline's: {100 * cv["mlp_minus_best_baseline_macro_f1"]:+.1f} points.

![confusion matrix](confusion_matrix.png)
"""
    return f"""An MLP ({clf["hidden_dims"]} hidden, GELU, dropout, {clf["parameters"]:,} parameters) over hashed word
1-2-grams and character 2-5-grams, TF-IDF weighted, of a passage of {clf["min_chars"]}-{clf["max_chars"]} characters.
It uses no LM features, so cross-validation needs no LM per fold. Speaker lines are removed and play-specific names are
replaced by `NAME`, in training and test passages alike, for all three models. Labels: {", ".join(clf["labels"])}.

{cv_section}
On the single split above ({clf["test_passages"]} passages from the test plays):

| model | accuracy | macro-F1 |
|---|---|---|
{rows}
"""


def model_card(manifest: dict[str, Any], metrics: dict[str, Any], command: str) -> str:
    lm = metrics["lm"]
    ppmd = lm["ppmd"]
    split = manifest["split"]
    versus = 100 * (lm["test_bpc"] / ppmd["bpc"] - 1)
    arch = manifest["training"]["lm"]["model"]
    adaptive = lm["adaptive"]
    adapt_row = ""
    if adaptive["test_bpc"] is not None:
        cfg = adaptive["config"]
        adapt_row = (
            f"| test, with dynamic evaluation (lr {cfg['lr']:g}, {cfg['segment_len']}-character segments) "
            f"| {adaptive['test_bpc']:.3f} | {ppmd['bpc']:.3f} | {100 * (adaptive['ratio_to_ppmd'] - 1):+.1f} % |\n"
        )
    return f"""# Model card

Produced by `{command}` on {manifest["created"]}, in {metrics["seconds"]["total"] / 60:.1f} minutes
({manifest["training"]["device"]}). Every figure below is from that run and is repeated in `metrics.json`
(the corpus size and fingerprint in `manifest.json`).

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
{adapt_row}| validation ({lm["val_chars"]:,} chars) | {lm["val_bpc"]:.3f} | | |

The PPMd figure is C(train + test) - C(train) in bits over the test characters, with pyppmd's
variant I, {ppmd["mem_bytes"] >> 20} MiB of model memory, the best of orders
{", ".join(str(o) for o in ppmd["bpc_by_order"])}. The LSTM reads each test segment of
{lm["eval_segment_chars"]:,} characters from its start state. With dynamic evaluation (Krause et al., 2018;
`"adapt": true` on `/v1/score`), each test play is read whole from the start symbol; after each segment is
scored, one SGD step on it updates a private copy of the weights, so every character is scored before the
model trains on it. Learning rate and segment length were chosen on the validation plays
({len(adaptive["validation_trials"])} trials); scoring the {adaptive["test_chars"]:,} test characters this way took
{adaptive["test_seconds"]:.0f} s on {adaptive["device"]}.

## Genre classifier
{classifier_section(metrics["classifier"])}
## Limits
- Trained on Early Modern English drama only; modern prose gets high bits per character.
- Genre is decided from a few hundred characters; the single-split figures carry the sampling noise of seven
  test plays, which is why the cross-validated figures are the headline.
"""
