"""Static held-out bits per character against the LM's time budget, from finished training runs.

    python -m training.run --out /tmp/lm12 --max-minutes 12 --adapt-lrs --train-passages 60 --cv-folds 2
    python -m training.run --out /tmp/lm24 --max-minutes 24 --adapt-lrs --train-passages 60 --cv-folds 2
    python -m benchmarks.lm_budget artifacts /tmp/lm12 /tmp/lm24 [more run folders ...] [--name STEM]
    python -m benchmarks.lm_budget --compare lm_lr /tmp/lm12 /tmp/lm12lr6   (any settings; no fit)

Each folder is a training run's output (its manifest records the command, and the report repeats it).
The cosine schedule shrinks to fit `--max-minutes`, so every budget needs a run of its own; `--adapt-lrs`
with no rates leaves dynamic evaluation at its rate-0 check on validation text, and a small classifier
saves time; neither touches the LM. The rows must share
the LM's settings other than the budget, and its seed and split; this script refuses them otherwise.

The summary gives the gain of each doubling of the budget (test bits per character, averaged over the
runs of a budget) and fits the power law bpc = floor + scale x minutes^-exponent that LM loss curves
usually follow, least squares over a grid of exponents: its floor, and the minutes it would need to
reach the issue's target, 0.97 x PPMd (infinite where the floor is above the target).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, write_report

TARGET_RATIO = 0.97  # the static target, as a multiple of PPMd's bits per character


def run_row(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's figures, and the settings that runs compared by budget must share (seed, split, LM)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())["lm"]
    lm_training = manifest["training"]["lm"]
    row = {
        "folder": str(folder),
        "command": manifest["command"],
        "max_minutes": lm_training["max_minutes"],
        "steps": metrics["steps"],
        "val_bpc": metrics["val_bpc"],
        "test_bpc": metrics["test_bpc"],
        "ppmd_bpc": metrics["ppmd"]["bpc"],
        "ratio_to_ppmd": metrics["ratio_to_ppmd"],
    }
    shared = {
        "seed": manifest["seed"],
        "split": manifest["split"],
        "lm": {k: v for k, v in lm_training.items() if k != "max_minutes"},
    }
    return row, shared


def power_law_fit(minutes: list[float], bpc: list[float]) -> tuple[float, float, float]:
    """(floor, scale, exponent) of bpc = floor + scale * minutes**-exponent, least squares: for each
    exponent on a grid, floor and scale are a linear regression on minutes**-exponent."""
    best: tuple[float, float, float, float] | None = None
    for step in range(1, 301):
        exponent = step / 100
        xs = [m**-exponent for m in minutes]
        scale, floor = statistics.linear_regression(xs, bpc)
        error = sum((floor + scale * x - y) ** 2 for x, y in zip(xs, bpc, strict=True))
        if best is None or error < best[0]:
            best = (error, floor, scale, exponent)
    assert best is not None
    return best[1], best[2], best[3]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training output folders")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--name", default="lm_budget", help="the budget fit's report, STEM.json and .md (one per set of settings)"
    )
    parser.add_argument(
        "--compare",
        metavar="STEM",
        help="only tabulate the runs, whatever their settings (peak learning rate shown), into STEM.json and .md",
    )
    args = parser.parse_args(argv)
    runs = sorted((run_row(f) for f in args.runs), key=lambda run: (run[0]["max_minutes"], run[0]["folder"]))
    rows = [row for row, _ in runs]
    if args.compare:
        for row, shared in runs:
            row["peak_lr"] = shared["lm"]["lr"]
        table = "| run | LM budget (minutes) | peak lr | steps | validation bpc | test bpc | vs PPMd |\n" + (
            "|---|---|---|---|---|---|---|\n"
            + "".join(
                f"| `{r['command']}` | {r['max_minutes']:g} | {r['peak_lr']:g} | {r['steps']:,} | {r['val_bpc']:.3f} "
                f"| {r['test_bpc']:.3f} | {r['ratio_to_ppmd']:.3f} x |\n"
                for r in rows
            )
        )
        write_report(args.out, args.compare, {"rows": rows}, table)
        return 0
    if len({json.dumps(shared, sort_keys=True) for _, shared in runs}) != 1:
        raise SystemExit("the runs differ in more than their budget (seed, split or LM settings)")
    budgets = sorted({r["max_minutes"] for r in rows})
    if len(budgets) < 3:
        raise SystemExit("give runs of at least three budgets: the power law has three parameters")
    ppmd = rows[0]["ppmd_bpc"]
    target = TARGET_RATIO * ppmd
    mean_test = [statistics.fmean(r["test_bpc"] for r in rows if r["max_minutes"] == m) for m in budgets]
    floor, scale, exponent = power_law_fit(budgets, mean_test)
    minutes_for_target = ((target - floor) / scale) ** (-1 / exponent) if target > floor else math.inf
    summary = {
        "ppmd_bpc": ppmd,
        "target_bpc": target,
        "mean_test_bpc_by_budget": dict(zip(map(str, budgets), mean_test, strict=True)),
        "power_law": {"floor": floor, "scale": scale, "exponent": exponent},
        "minutes_for_target_on_the_power_law": minutes_for_target,
    }
    gains = "; ".join(
        f"{a:g} to {b:g} minutes: {bpc_a - bpc_b:.3f}"
        for (a, bpc_a), (b, bpc_b) in itertools.pairwise(zip(budgets, mean_test, strict=True))
    )
    table = (
        "| LM budget (minutes) | steps | validation bpc | test bpc | vs PPMd |\n|---|---|---|---|---|\n"
        + "".join(
            f"| {r['max_minutes']:g} | {r['steps']:,} | {r['val_bpc']:.3f} | {r['test_bpc']:.3f} "
            f"| {r['ratio_to_ppmd']:.3f} x |\n"
            for r in rows
        )
        + f"\nGain in mean test bits per character: {gains}. Fitted power law: {floor:.3f} + {scale:.3f} x "
        f"minutes^-{exponent:.2f}; on it, the target ({target:.3f}, 0.97 x PPMd) would take "
        f"{minutes_for_target:,.0f} minutes of LM training on this machine.\n"
    )
    write_report(args.out, args.name, {"rows": rows, "summary": summary}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
