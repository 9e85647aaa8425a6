"""Training: corpus handling, splits, reproducibility, and that a failed run changes nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

from seqmodels import artifacts as artifact_format
from seqmodels.artifacts import load_artifacts
from seqmodels.networks import ClassifierConfig, NgramBatch, ngram_counts
from tests.conftest import TINY_TRAIN_ARGS
from training import run as training_run
from training.corpus import (
    CorpusError,
    Document,
    load_labels,
    load_plays,
    load_text_corpus,
    mask_speakers,
    play_specific_names,
    split_documents,
)


@pytest.fixture(scope="module")
def plays() -> list[Document]:
    return load_plays()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- default corpus


def test_default_corpus_is_38_plays_in_6_genres(plays: list[Document]) -> None:
    assert len(plays) == 38
    assert {d.label for d in plays} == {"comedies", "histories", "problems", "roman", "romances", "tragedies"}
    assert 4_500_000 < sum(len(d.text) for d in plays) < 5_500_000


def test_markdown_markup_is_gone(plays: list[Document]) -> None:
    for doc in plays:
        assert not re.search(r"[*_#\\]", doc.text), doc.name
        assert "  \n" not in doc.text
    hamlet = next(d for d in plays if d.name == "tragedies/hamlet")
    assert hamlet.text.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    assert "\nBERNARDO\nWho's there?\n" in hamlet.text
    assert "HAMLET" in hamlet.speakers


def test_default_split_is_disjoint_stratified_and_seeded(plays: list[Document]) -> None:
    split = split_documents(plays, seed=1234)
    train, val, test = set(split.train), set(split.validation), set(split.test)
    assert not (train & val or train & test or val & test)
    assert train | val | test == {d.name for d in plays}
    label = {d.name: d.label for d in plays}
    for part in (val, test):
        assert {label[n] for n in part} == set(label.values())  # every genre is held out
    assert split_documents(plays, seed=1234) == split
    assert split_documents(plays, seed=99) != split


def test_speaker_masking_hides_play_specific_names(plays: list[Document]) -> None:
    hamlet = next(d for d in plays if d.name == "tragedies/hamlet")
    names = play_specific_names(plays)[hamlet.name]
    assert {"hamlet", "horatio", "polonius"} <= names
    assert "king" not in names  # a role shared by many plays is not a name
    masked = mask_speakers(hamlet, names)
    assert not re.search(r"\b(Horatio|HORATIO|Polonius|Ophelia)\b", masked)
    assert "\nBERNARDO\n" not in masked
    assert "NAME" in masked


# --------------------------------------------------------------------------- user inputs


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nsecond line\nbroken \xff here\n")
    with pytest.raises(CorpusError, match=r"bad\.txt:3: not valid UTF-8"):
        load_text_corpus([bad])


def test_missing_corpus_path(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="no such file or folder"):
        load_text_corpus([tmp_path / "nope"])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("l.csv", "words,label\na,b\n", r"l\.csv:1: expected the header 'text,label'"),
        ("l.csv", "text,label\nhello,x\nno label here\n", r"l\.csv:3: expected 2 fields"),
        ("l.csv", 'text,label\nhello,x\n"a\nb",y\n,z\n', r"l\.csv:5: empty text or label"),
        ("l.csv", "text,label\na,x\nb,x\n", r"needs at least two different labels"),
        ("l.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"\n', r"l\.jsonl:2: not valid JSON"),
        ("l.jsonl", '{"text": "a", "label": "x"}\n[1, 2]\n', r"l\.jsonl:2: expected an object"),
    ],
)
def test_malformed_labels_file(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match=message):
        load_labels(path)


def test_labels_file_reads_csv_and_jsonl(tmp_path: Path) -> None:
    csv_path = tmp_path / "l.csv"
    csv_path.write_text('text,label\n"Hello, there",greeting\nbye,farewell\n', encoding="utf-8")
    assert [(d.text, d.label) for d in load_labels(csv_path)] == [("Hello, there", "greeting"), ("bye", "farewell")]
    jsonl_path = tmp_path / "l.jsonl"
    jsonl_path.write_text('{"text": "hi", "label": "g"}\n\n{"text": "bye", "label": 2}\n', encoding="utf-8")
    assert [(d.text, d.label) for d in load_labels(jsonl_path)] == [("hi", "g"), ("bye", "2")]


def test_cli_reports_bad_input_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("text,label\nonly one field\n", encoding="utf-8")
    code = training_run.cli(["--labels", str(labels), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {labels}:2: expected 2 fields" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- artifacts of a run


def test_tiny_run_records_split_and_metrics(tiny_artifacts: Path) -> None:
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    split = manifest["split"]
    assert not set(split["train"]) & set(split["test"])
    assert not set(split["validation"]) & set(split["test"])
    assert manifest["classifier_split"] == split  # the classifier holds out the same documents
    metrics = json.loads((tiny_artifacts / "metrics.json").read_text())
    assert metrics["lm"]["test_bpc"] > 0 and metrics["lm"]["ppmd"]["bpc"] > 0
    assert set(metrics["classifier"]) >= {"mlp", "tfidf_logreg", "majority", "cross_validation"}
    cv = metrics["classifier"]["cross_validation"]
    tested = [name for fold in cv["per_fold"] for name in fold["test_documents"]]
    assert sorted(tested) == sorted(split["train"] + split["validation"] + split["test"])  # each play once
    assert sum(map(sum, cv["mlp_confusion"])) == sum(fold["test_passages"] for fold in cv["per_fold"])
    assert (tiny_artifacts / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adaptive = metrics["lm"]["adaptive"]
    assert adaptive["config"] == {"lr": 0.1, "segment_len": 40, "decay": 0.0}
    assert adaptive["test_bpc"] > 0 and [t["lr"] for t in adaptive["validation_trials"]] == [0.0, 0.1]
    assert adaptive["test_chars"] == metrics["lm"]["test_chars"]  # static and adaptive on the same characters
    for name in ("MODEL_CARD.md", "training_curves.png", "lm/model.safetensors", "classifier/config.json"):
        assert name in manifest["files"]
    assert (tiny_artifacts / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (tiny_artifacts / "MODEL_CARD.md").read_text()
    assert f"{metrics['lm']['test_bpc']:.3f}" in card
    lm_config = json.loads((tiny_artifacts / "lm" / "config.json").read_text())
    assert lm_config["vocabulary"][0] == "\ufffd"
    assert load_artifacts(tiny_artifacts).labels == ["comedies", "tragedies"]


def test_runs_are_reproducible(tmp_path: Path, tiny_corpus: Path, tiny_artifacts: Path) -> None:
    out = tmp_path / "again"
    assert training_run.main(["--corpus", str(tiny_corpus), "--out", str(out), *TINY_TRAIN_ARGS]) == 0
    for name in ("lm/model.safetensors", "classifier/model.safetensors"):
        first, second = load_file(str(tiny_artifacts / name)), load_file(str(out / name))
        assert first.keys() == second.keys()
        for key in first:
            assert first[key].equal(second[key]), f"{name}:{key}"


def test_versions_go_into_a_repository_one_after_another(
    tmp_path: Path, tiny_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--repository R --name N` writes R/N/1, then R/N/2, each renamed into place when complete, and leaves
    the versions before it as they were; an interrupted run adds no version and leaves no staging folder."""
    repository = tmp_path / "models"
    args = ["--corpus", str(tiny_corpus), "--repository", str(repository), "--name", "tiny", *TINY_TRAIN_ARGS]
    assert training_run.main([*args, "--max-steps", "4"]) == 0
    first = snapshot(repository / "tiny" / "1")
    assert training_run.main([*args, "--max-steps", "4", "--seed", "8"]) == 0
    assert snapshot(repository / "tiny" / "1") == first
    second = load_artifacts(repository / "tiny" / "2").manifest["files"]
    assert second != load_artifacts(repository / "tiny" / "1").manifest["files"]

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(training_run, "train_classifier", interrupt)
    assert training_run.cli([*args, "--max-steps", "4"]) == 130
    assert sorted(p.name for p in (repository / "tiny").iterdir()) == ["1", "2"]
    with pytest.raises(SystemExit):
        training_run.parse_args(["--repository", str(repository), "--name", "../escape"])
    with pytest.raises(SystemExit):
        training_run.parse_args(["--repository", str(repository)])


@pytest.mark.parametrize(
    ("module", "failing_step"),
    [(training_run, "train_classifier"), (artifact_format, "sha256_file")],  # during training; mid-write
)
def test_interrupted_run_leaves_previous_artifacts_untouched(
    tmp_path: Path,
    tiny_corpus: Path,
    tiny_artifacts: Path,
    monkeypatch: pytest.MonkeyPatch,
    module: ModuleType,
    failing_step: str,
) -> None:
    out = tmp_path / "artifacts"
    training_run.main(["--corpus", str(tiny_corpus), "--out", str(out), *TINY_TRAIN_ARGS, "--max-steps", "4"])
    before = snapshot(out)

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(module, failing_step, interrupt)
    code = training_run.cli(["--corpus", str(tiny_corpus), "--out", str(out), *TINY_TRAIN_ARGS, "--seed", "8"])
    assert code == 130
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]  # no staging folder left behind


def test_ngram_batch_concat_matches_of() -> None:
    config = ClassifierConfig()
    counts = [ngram_counts(t, config) for t in ("To be, or not to be", "O Romeo, Romeo!", "a")]
    built = NgramBatch.of(counts)
    joined = NgramBatch.concat([NgramBatch.text_tensors(c) for c in counts])
    for name in ("index", "count", "row"):
        assert torch.equal(getattr(built, name), getattr(joined, name))
    assert built.size == joined.size == 3


def test_every_config_field_is_a_flag_with_its_comment_as_help() -> None:
    """The LM's and the classifier's configs, nested ones included, are overridable field by field, and the
    help of each flag is the comment beside the field."""
    import dataclasses

    from seqmodels.networks import ClassifierConfig, LMConfig
    from training.classifier import ClassifierTrainConfig
    from training.flags import DERIVED, config_from, field_comments
    from training.lm import LMTrainConfig
    from training.run import parse_args

    args = parse_args(["--lr", "0.01", "--layers", "3", "--classifier-lr", "0.5", "--cv-folds", "4",
                       "--classifier-hidden", "8", "16", "--embed-dropout", "0.2"])  # fmt: skip
    lm: LMTrainConfig = config_from(args, LMTrainConfig)
    clf: ClassifierTrainConfig = config_from(args, ClassifierTrainConfig, "classifier.")
    assert (lm.lr, lm.model.num_layers, lm.model.embed_dropout) == (0.01, 3, 0.2)
    assert (clf.lr, clf.cv_folds, clf.model.hidden_dims) == (0.5, 4, [8, 16])
    assert config_from(parse_args([]), LMTrainConfig) == LMTrainConfig()  # the defaults are the dataclasses'
    assert config_from(parse_args([]), ClassifierTrainConfig, "classifier.") == ClassifierTrainConfig()
    values = vars(parse_args([]))
    for cls, dest in ((LMTrainConfig, ""), (LMConfig, "model."), (ClassifierTrainConfig, "classifier."),
                      (ClassifierConfig, "classifier.model.")):  # fmt: skip
        for field in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(field.type) and field.name not in DERIVED and field.name != "model":
                assert f"{dest}{field.name}" in values, f"{cls.__name__}.{field.name} has no flag"
                assert field_comments(cls).get(field.name), f"{cls.__name__}.{field.name} has no comment"
