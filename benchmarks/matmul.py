"""Why the decode step uses oneDNN: one matmul of the model's shapes, MKL (`torch.addmm`) against
`PackedLinear` (oneDNN, prepacked weight), by the number of rows.

    python -m benchmarks.matmul [--out benchmarks]

One torch thread, as in a worker. Writes matmul.json and matmul.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, timed, utc_now, write_report
from service.engine.lstm_kernels import PackedLinear

REPO = Path(__file__).resolve().parent.parent
ROWS = (1, 2, 4, 8, 16, 32)
SHAPES = {  # (in, out) of the 2-layer, 512-wide model's step matmuls
    "recurrent, 512 -> 2048": (512, 2048),
    "upper layer [x, h], 1024 -> 2048": (1024, 2048),
}


def microseconds(fn: Callable[[], Any]) -> float:
    """Median over 7 runs of 200 calls, per call."""

    def run() -> None:
        for _ in range(200):
            fn()

    return timed(run, 7) / 200 * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    results: dict[str, dict[str, dict[int, float]]] = {}
    for name, (fan_in, fan_out) in SHAPES.items():
        weight = torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5
        bias = torch.randn(fan_out, generator=generator)
        transposed = weight.t().contiguous()
        packed = PackedLinear(weight, bias)
        if not packed.uses_onednn:
            print("this torch build has no oneDNN linear: nothing to compare", file=sys.stderr)
            return 1
        results[name] = {"mkl_addmm_us": {}, "onednn_packed_us": {}}
        for rows in ROWS:
            x = torch.randn(rows, fan_in, generator=generator)
            mkl = partial(torch.addmm, bias, x, transposed)
            onednn = partial(packed, x)
            with torch.inference_mode():
                results[name]["mkl_addmm_us"][rows] = round(microseconds(mkl), 1)
                results[name]["onednn_packed_us"][rows] = round(microseconds(onednn), 1)
        print(name, results[name], flush=True)
    report = {
        "date": utc_now(),
        "machine": f"{platform.machine()}, torch {torch.__version__}, one thread",
        "results": results,
    }
    lines = [
        f"Measured {report['date']} with `python -m benchmarks.matmul` ({report['machine']}); "
        "microseconds per matmul, median of 7 x 200 calls.",
        "",
        "| matmul | kernel | " + " | ".join(f"{r} rows" for r in ROWS) + " |",
        "|---|---|" + "---|" * len(ROWS),
    ]
    for name, kernels in results.items():
        for kernel, by_rows in kernels.items():
            lines.append(f"| {name} | {kernel} | " + " | ".join(f"{by_rows[r]:.0f}" for r in ROWS) + " |")
    write_report(args.out, "matmul", report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
