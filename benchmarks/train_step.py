"""Where one LM optimizer step spends its time, and what bfloat16 autocast and the shape change.

    python -m benchmarks.train_step [--repeats 5]

Times the phases of the real training step (`training.lm`: batch assembly, forward with AWD-LSTM
dropouts, backward, clip + AdamW) for each batch x window and autocast setting, on this machine's
CPU (or the GPU with --device cuda), and reports medians and characters per second. Writes
benchmarks/results/train_step.json and .md. Run it on a quiet machine: nothing else should hold the cores.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, write_report
from seqmodels.networks import CharLSTM, LMConfig
from training.lm import LMTrainConfig, make_optimizer, stream_batches


def phases(batch: int, window: int, bfloat16: bool, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per phase of one training step."""
    torch.manual_seed(0)
    cfg = LMTrainConfig(batch_size=batch, seq_len=window)
    model = CharLSTM(LMConfig(vocab_size=69)).to(device).train()
    optimizer = make_optimizer(model, cfg)
    ids = torch.randint(0, 69, (batch * window * 20,))
    batches = stream_batches(ids, cfg, 69, torch.Generator().manual_seed(0))
    state = model.zero_state(batch, device)
    times: dict[str, list[float]] = {"data": [], "forward": [], "backward": [], "optimizer": []}

    def mark() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    for step in range(repeats + 1):  # the first step warms up allocators and kernels
        t0 = mark()
        inputs, targets, _ = next(batches)
        inputs, targets = inputs.to(device), targets.to(device)
        t1 = mark()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bfloat16):
            _, loss, new_state = model(inputs, targets, state)
        assert loss is not None
        t2 = mark()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = mark()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        t4 = mark()
        state = (new_state[0].detach().float(), new_state[1].detach().float())
        if step:
            for name, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=["64x128", "128x128", "32x256"], help="batch x window")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for shape in args.shapes:
        batch, window = (int(n) for n in shape.split("x"))
        for bfloat16 in (False, True):
            median = phases(batch, window, bfloat16, args.repeats, device)
            total = sum(median.values())
            rows.append(
                {"batch": batch, "window": window, "bfloat16": bfloat16, **median, "step": total,
                 "chars_per_second": batch * window / total}
            )  # fmt: skip
            print(rows[-1], flush=True)
    table = "| batch x window | autocast | data | forward | backward | clip + AdamW | step | chars/s |\n"
    table += "|---|---|---|---|---|---|---|---|\n"
    for r in rows:
        table += (
            f"| {r['batch']} x {r['window']} | {'bfloat16' if r['bfloat16'] else 'off (float32)'} "
            + "".join(f"| {1000 * r[k]:.0f} ms " for k in ("data", "forward", "backward", "optimizer", "step"))
            + f"| {r['chars_per_second']:,.0f} |\n"
        )
    report = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "rows": rows}
    write_report(args.out, "train_step", report, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
