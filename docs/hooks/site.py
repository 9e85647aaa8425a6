"""MkDocs hooks for the documentation site (mkdocs.yml): the configuration table is generated from the
service's Settings, and the benchmark records in benchmarks/results/*.md become pages under records/, so that the
experiments page links them and `mkdocs build --strict` checks those links."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[2]


def _default(value: Any) -> str:
    if value is None or value == "":
        return "unset"
    if isinstance(value, bool):
        return "1" if value else "0"
    return f"`{value}`"


def settings_table() -> str:
    """Every Settings field as the environment variable it is read from, its default and its description."""
    from service.settings import Settings

    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{name.upper()}` | {_default(field.default)} | {meaning} |")
    return "\n".join(rows)


def records_index() -> str:
    """A line per benchmark record: its page, and the first line that says what it measured."""
    rows = ["| record | what it holds |", "|---|---|"]
    for path in sorted((REPO / "benchmarks" / "results").glob("*.md")):
        text = path.read_text(encoding="utf-8")
        first = next((line.strip("# ").strip() for line in text.splitlines() if line.strip()), "")
        first = re.sub(r"\s+", " ", first).replace("|", "\\|")
        rows.append(f"| [{path.stem}](records/{path.name}) | {first[:160]} |")
    return "\n".join(rows)


def on_files(files: Files, config: Any) -> Files:
    for path in sorted((REPO / "benchmarks" / "results").glob("*.md")):
        files.append(File.generated(config, f"records/{path.name}", content=path.read_text(encoding="utf-8")))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    return markdown.replace("<!-- settings -->", settings_table()).replace("<!-- records -->", records_index())
