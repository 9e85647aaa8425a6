"""Cheaper weights: held-out bits per character and step speed of the fused kernel in float32 and bfloat16.

    python -m benchmarks.precision [--out benchmarks]

The held-out text is the committed artifacts' test split (rebuilt from the manifest), read in
segments of 8,192 characters from the start symbol, exactly as training evaluates; the
float32 figure therefore reproduces `metrics.json`'s test_bpc. Writes precision.json and .md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.serve import timed, utc_now, write_report
from seqmodels.artifacts import LoadedModels, load_artifacts
from service.kernels import FusedStep
from training.corpus import load_plays
from training.run import EVAL_SEGMENT, join

REPO = Path(__file__).resolve().parent.parent


def test_text(models: LoadedModels) -> str:
    """The test split as training joined it."""
    return join(load_plays(), models.manifest["split"]["test"])


@torch.inference_mode()
def heldout_bpc(models: LoadedModels, kernel: FusedStep, text: str) -> tuple[float, torch.Tensor]:
    """Bits per character with every segment stepped through `kernel` as one batch, and the
    log-probability (nats) of every target, segment by segment."""
    vocab = models.vocab
    ids = torch.tensor(vocab.encode(text))
    segments = [ids[i : i + EVAL_SEGMENT] for i in range(0, len(ids), EVAL_SEGMENT)]
    rows, length = len(segments), max(len(s) for s in segments)
    targets = torch.full((rows, length), -1, dtype=torch.long)
    for row, segment in enumerate(segments):
        targets[row, : len(segment)] = segment
    layers, hidden = models.lm.config.num_layers, models.lm.config.hidden_size
    h, c = torch.zeros(layers, rows, hidden), torch.zeros(layers, rows, hidden)
    inputs = torch.full((rows,), vocab.bos_id, dtype=torch.long)
    logprobs = torch.zeros(rows, length, dtype=torch.float64)
    for t in range(length):
        logits = kernel(inputs, h, c)
        step = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, t, None].clamp_min(0))[:, 0]
        logprobs[:, t] = torch.where(targets[:, t] >= 0, step.double(), 0.0)
        inputs = targets[:, t].clamp_min(0)
    return float(-logprobs.sum()) / len(ids) / math.log(2), logprobs[targets >= 0]


def step_us(kernel: FusedStep, rows: int, hidden: int, layers: int) -> float:
    """Median microseconds per step, over 7 runs of 100 steps."""
    ids = torch.zeros(rows, dtype=torch.long)
    h, c = torch.zeros(layers, rows, hidden), torch.zeros(layers, rows, hidden)

    @torch.inference_mode()
    def hundred_steps() -> None:
        for _ in range(100):
            kernel(ids, h, c)

    return timed(hundred_steps, 7) / 100 * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = load_artifacts(args.artifacts)
    text = test_text(models)
    hidden, layers = models.lm.config.hidden_size, models.lm.config.num_layers
    rows: dict[str, dict[str, Any]] = {}
    logprobs: dict[str, torch.Tensor] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        kernel = FusedStep(models.lm, dtype)
        started = time.perf_counter()
        bpc, logprobs[name] = heldout_bpc(models, kernel, text)
        rows[name] = {
            "test_bpc": round(bpc, 5),
            "eval_seconds": round(time.perf_counter() - started, 1),
            **{f"step_us_batch{b}": round(step_us(kernel, b, hidden, layers), 1) for b in (1, 8, 32)},
        }
        print(name, rows[name], flush=True)
    base, half = rows["float32"], rows["bfloat16"]
    drift = (logprobs["bfloat16"] - logprobs["float32"]).abs()
    report = {
        "date": utc_now(),
        "test_chars": len(text),
        "metrics_json_test_bpc": models.manifest["metrics"]["lm"]["test_bpc"],
        "kernels": rows,
        "logprob_abs_diff_nats": {"max": round(float(drift.max()), 5), "median": float(drift.median())},
        "bpc_change_percent": round(100 * (half["test_bpc"] / base["test_bpc"] - 1), 3),
        "speedup": {f"batch{b}": round(base[f"step_us_batch{b}"] / half[f"step_us_batch{b}"], 2) for b in (1, 8, 32)},
    }
    lines = [
        f"Measured {report['date']} with `python -m benchmarks.precision` (one thread; the committed artifacts'",
        f"test split, {len(text):,} characters; training's own evaluation gave {report['metrics_json_test_bpc']:.5f}).",
        "",
        "| weights | test bits/char | step us, batch 1 | batch 8 | batch 32 |",
        "|---|---|---|---|---|",
        *(
            f"| {n} | {r['test_bpc']:.5f} | {r['step_us_batch1']} | {r['step_us_batch8']} | {r['step_us_batch32']} |"
            for n, r in rows.items()
        ),
        "",
        f"bfloat16 changes held-out bits per character by {report['bpc_change_percent']:+.3f} %; "
        f"speed-up per step: {report['speedup']}. A character's log-probability differs from float32's by at "
        f"most {report['logprob_abs_diff_nats']['max']:.4f} nats (median "
        f"{report['logprob_abs_diff_nats']['median']:.1e}) over the test split.",
    ]
    write_report(args.out, "precision", report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
