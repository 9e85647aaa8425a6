"""What the benchmark modules share: the repository's paths, the texts their requests are cut from,
percentiles and timings, and the stamp and files every report gets."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts"
RESULTS = REPO / "benchmarks" / "results"  # the benchmarks' records, each a .md and a .json

# --------------------------------------------------------------------------- texts

PROMPT_100 = "HAMLET. To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer the sli"
assert len(PROMPT_100) == 100
TEXT_200 = (
    "KING. Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
    "that lour'd upon our house in the deep bosom of the ocean buried. Now are our brows bound with victorious"
)[:200]
assert len(TEXT_200) == 200
# Every request of a scenario gets its own text (a window of this one, at an offset that follows the
# request's number) and its own seed, so that no request's work repeats another's: a server that
# cached or shared work between identical requests would otherwise look faster than it is.
SOURCE = PROMPT_100 + " " + TEXT_200 + " "


def window(number: int, length: int) -> str:
    start = number % len(SOURCE)
    return (SOURCE + SOURCE)[start : start + length]


def unique_tag(number: int, length: int) -> str:
    """`length` letters that differ for every request number below 26 ** length (digits would all read
    as U+FFFD)."""
    letters = []
    for _ in range(length):
        number, digit = divmod(number, 26)
        letters.append(chr(ord("a") + digit))
    return "".join(letters)


# --------------------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def timed(fn: Any, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


# --------------------------------------------------------------------------- reports


def phase_table(setting: str, phases: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows of closed-loop phases (benchmarks.inference_protocol's closed_loop figures) by setting."""
    lines = [f"| {setting} | goodput/s | p50 ms | p99 ms |", "|---|---|---|---|"]
    for phase, figures in phases.items():
        lines.append(f"| {phase} | {figures['goodput']:.0f} | {figures['p50_ms']:.1f} | {figures['p99_ms']:.1f} |")
    return lines


def write_report(folder: Path, stem: str, report: dict[str, Any], table: str) -> None:
    """`stem`.json and `stem`.md in `folder`, and the table on stdout."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / f"{stem}.md").write_text(table)
    print(table)


def stamp(module: str, argv: list[str] | None) -> dict[str, str]:
    """What a report starts with: the command that made it, when, and on what machine."""
    args = sys.argv[1:] if argv is None else argv
    return {"command": f"python -m {module}" + "".join(f" {a}" for a in args), "when": utc_now(),
            "machine": machine(), "cpu": cpu_name()}  # fmt: skip


def utc_now() -> str:
    """The date and minute a report is stamped with."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"
