"""Command-line flags generated from the training configs' dataclasses, nanoGPT-style: every field of
`LMTrainConfig` (and its `LMConfig`) and of `ClassifierTrainConfig` (and its `ClassifierConfig`) is a
flag, with the field's default and, as help, the comment written beside it. A default is documented
once, where the field is declared, and every field can be overridden.

    --lr 0.003 --hidden-size 256       LM fields, and the LM's architecture, by their names
    --classifier-lr 0.001              the classifier's, prefixed
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from typing import Any

# Fields a run derives and never takes from the command line.
DERIVED = {"vocab_size", "num_labels"}
# Older spellings that stay accepted: flag name -> the generated one.
ALIASES = {
    "--layers": "--num-layers",
    "--train-passages": "--classifier-train-per-label",
    "--eval-passages": "--classifier-eval-per-document",
    "--classifier-hidden": "--classifier-hidden-dims",
    "--cv-folds": "--classifier-cv-folds",
}
_COMMENTED = re.compile(r"^\s+(\w+): [^=]+=.*?#\s*(.+?)\s*$")


def field_comments(cls: type) -> dict[str, str]:
    """The comment beside each field of a dataclass, read from its source (a field with none gets "")."""
    comments: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        match = _COMMENTED.match(line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


def add_config_flags(parser: argparse._ActionsContainer, cls: type, prefix: str = "", dest: str = "") -> None:
    """A flag for every field of dataclass `cls`, recursing into nested configs (their fields keep the
    prefix); the parsed value lands in `dest + field` (nested: `dest + "model." + field`)."""
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        hint, default = hints[f.name], getattr(defaults, f.name)
        if dataclasses.is_dataclass(hint):
            add_config_flags(parser, hint, prefix, f"{dest}{f.name}.")  # type: ignore[arg-type]
            continue
        if f.name in DERIVED:
            continue
        flag = f"--{prefix}{f.name.replace('_', '-')}"
        names = [flag, *(old for old, new in ALIASES.items() if new == flag)]
        help_text = comments.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        options: dict[str, Any] = {
            "dest": f"{dest}{f.name}",
            "default": default,
            "help": help_text,
            "metavar": f.name.upper(),
        }
        if typing.get_origin(hint) is list:
            options |= {"type": typing.get_args(hint)[0], "nargs": "+"}
        else:
            options["type"] = hint
        parser.add_argument(*names, **options)


def config_from(args: argparse.Namespace, cls: type, dest: str = "") -> Any:
    """An instance of dataclass `cls` from the parsed flags `add_config_flags` made for it."""
    values = vars(args)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = config_from(args, hints[f.name], f"{dest}{f.name}.")  # type: ignore[arg-type]
        elif f"{dest}{f.name}" in values:
            value = values[f"{dest}{f.name}"]
            kwargs[f.name] = list(value) if isinstance(value, list | tuple) else value
    return cls(**kwargs)
