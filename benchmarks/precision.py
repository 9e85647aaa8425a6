"""Cheaper weights: held-out bits per character and speed of the kernels in float32 and bfloat16, and
dynamic int8 quantization measured beside them.

    python -m benchmarks.precision [--out benchmarks]

The held-out text is the committed artifacts' test split (rebuilt from the manifest), read in
segments of 8,192 characters from the start symbol, exactly as training evaluates; the float32
figures therefore reproduce `metrics.json`'s test_bpc. Two paths per precision: the whole-sequence
pass of prompts and scoring, and the decode step fed every character. Writes precision.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, cpu_name, timed, utc_now, write_report
from seqmodels.artifacts import LoadedModels, load_artifacts
from service.engine.lstm_kernels import FusedStep, PackedLinear
from training.corpus import load_plays
from training.evaluation import EVAL_SEGMENT
from training.run import held_out_text

REPO = Path(__file__).resolve().parent.parent


def test_text(models: LoadedModels) -> str:
    """The test split's characters as training measures them (artifacts trained before the held-out figures
    left out the newlines between documents were measured with them: 6 characters more of 957,850)."""
    return held_out_text(load_plays(), models.manifest["split"]["test"])


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


@torch.inference_mode()
def scored_bpc(models: LoadedModels, run: Any, text: str) -> tuple[float, torch.Tensor]:
    """Bits per character through a whole-sequence pass, `run(inputs (B, T)) -> logits (B, T, V)`: the
    path of prompts and /v1/score. Segments of EVAL_SEGMENT characters from the start symbol, 4 at a time."""
    vocab = models.vocab
    ids = torch.tensor(vocab.encode(text))
    values = []
    segments = [ids[i : i + EVAL_SEGMENT] for i in range(0, len(ids), EVAL_SEGMENT)]
    for first in range(0, len(segments), 4):
        group = segments[first : first + 4]
        length = max(len(s) for s in group)
        targets = torch.full((len(group), length), 0, dtype=torch.long)
        for row, segment in enumerate(group):
            targets[row, : len(segment)] = segment
        inputs = torch.cat([torch.full((len(group), 1), vocab.bos_id), targets[:, :-1]], dim=1)
        logprobs = torch.log_softmax(run(inputs).double(), dim=-1).gather(-1, targets[..., None])[..., 0]
        values += [logprobs[row, : len(segment)] for row, segment in enumerate(group)]
    flat = torch.cat(values)
    return float(-flat.sum()) / len(ids) / math.log(2), flat


def prefill_ms(kernel: FusedStep, rows: int, chars: int = 100) -> float:
    """Median milliseconds to encode `rows` prompts of `chars` characters together."""
    prompts = [[(7 * row + i) % 60 for i in range(chars + 1)] for row in range(rows)]

    @torch.inference_mode()
    def encode() -> None:
        kernel.prefill(prompts)

    return timed(encode, 15) * 1000


def int8_figures(models: LoadedModels, text: str, reference: torch.Tensor) -> dict[str, Any]:
    """Dynamic int8 quantization (torch.ao, fbgemm), measured but not served: its quality through nn.LSTM
    on the scoring path, the step's largest matmul against float32 and bfloat16, and whether a row's result
    depends on the other rows of its batch (activations are quantized per batch)."""
    with warnings.catch_warnings():  # torch.ao's quantized tensors are deprecated as of torch 2.13
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(models.lm), {torch.nn.LSTM, torch.nn.Linear}, dtype=torch.qint8
        )
        bpc, values = scored_bpc(models, lambda inputs: quantized(inputs)[0], text)
        lstm = dict(models.lm.lstm.named_parameters())
        weight = torch.cat([lstm["weight_ih_l1"], lstm["weight_hh_l1"]], dim=1).detach()
        bias = (lstm["bias_ih_l1"] + lstm["bias_hh_l1"]).detach()
        linear = torch.ao.nn.quantized.dynamic.Linear(weight.size(1), weight.size(0))
        linear.set_weight_bias(
            torch.quantize_per_channel(
                weight, weight.abs().amax(1) / 127, torch.zeros(weight.size(0), dtype=torch.long), 0, torch.qint8
            ),
            bias,
        )
        speeds, independent = {}, {}
        for rows in (1, 8, 32):
            x = torch.randn(rows, weight.size(1), generator=torch.Generator().manual_seed(rows))
            variants = {
                "float32": PackedLinear(weight, bias),
                "bfloat16": PackedLinear(weight, bias, torch.bfloat16),
                "int8": linear,
            }
            speeds[f"batch{rows}"] = {
                name: round(timed(lambda f=f, x=x: f(x), 200) * 1e6, 1) for name, f in variants.items()
            }
            alone = torch.cat([linear(x[i : i + 1]) for i in range(rows)])
            independent[f"batch{rows}"] = bool(torch.equal(linear(x), alone))
    drift = (values - reference).abs()
    return {
        "test_bpc": round(bpc, 5),
        "logprob_abs_diff_nats": {"max": round(float(drift.max()), 4), "median": float(drift.median())},
        "matmul_us_2048x1024": speeds,
        "rows_independent": independent,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = load_artifacts(args.artifacts)
    text = test_text(models)
    hidden, layers = models.lm.config.hidden_size, models.lm.config.num_layers
    rows: dict[str, dict[str, Any]] = {}
    stepped: dict[str, torch.Tensor] = {}
    scored: dict[str, torch.Tensor] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        kernel = FusedStep(models.lm, dtype)
        started = time.perf_counter()
        step_bpc, stepped[name] = heldout_bpc(models, kernel, text)
        step_seconds = time.perf_counter() - started
        started = time.perf_counter()
        score_bpc, scored[name] = scored_bpc(models, lambda inputs, k=kernel: k.sequence(inputs)[0], text)
        rows[name] = {
            "test_bpc_scored": round(score_bpc, 5),
            "test_bpc_stepped": round(step_bpc, 5),
            "score_seconds": round(time.perf_counter() - started, 1),
            "step_eval_seconds": round(step_seconds, 1),
            **{f"prefill_ms_100x{b}": round(prefill_ms(kernel, b), 2) for b in (1, 8)},
            **{f"step_us_batch{b}": round(step_us(kernel, b, hidden, layers), 1) for b in (1, 8, 32)},
        }
        print(name, rows[name], flush=True)
    base, half = rows["float32"], rows["bfloat16"]
    score_drift = (scored["bfloat16"] - scored["float32"]).abs()
    step_drift = (stepped["bfloat16"] - stepped["float32"]).abs()
    int8 = int8_figures(models, text, scored["float32"])
    print("int8", int8, flush=True)
    report = {
        "date": utc_now(),
        "cpu": cpu_name(),
        "test_chars": len(text),
        "metrics_json_test_bpc": models.manifest["metrics"]["lm"]["test_bpc"],
        "kernels": rows,
        "bfloat16_scored_logprob_abs_diff_nats": {
            "max": round(float(score_drift.max()), 5),
            "median": float(score_drift.median()),
        },
        "bfloat16_stepped_logprob_abs_diff_nats": {
            "max": round(float(step_drift.max()), 5),
            "median": float(step_drift.median()),
        },
        "bfloat16_bpc_change_percent": {
            "scored": round(100 * (half["test_bpc_scored"] / base["test_bpc_scored"] - 1), 3),
            "stepped": round(100 * (half["test_bpc_stepped"] / base["test_bpc_stepped"] - 1), 3),
        },
        "bfloat16_speedup": {
            **{f"prefill_100x{b}": round(base[f"prefill_ms_100x{b}"] / half[f"prefill_ms_100x{b}"], 2) for b in (1, 8)},
            **{f"step_batch{b}": round(base[f"step_us_batch{b}"] / half[f"step_us_batch{b}"], 2) for b in (1, 8, 32)},
        },
        "int8": int8,
        "int8_bpc_change_percent": round(100 * (int8["test_bpc"] / base["test_bpc_scored"] - 1), 3),
    }
    write_report(args.out, "precision", report, markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    rows, int8 = report["kernels"], report["int8"]
    scored_drift, stepped_drift = (
        report["bfloat16_scored_logprob_abs_diff_nats"],
        report["bfloat16_stepped_logprob_abs_diff_nats"],
    )
    lines = [
        f"Measured {report['date']} with `python -m benchmarks.precision` on {report['cpu']} (one thread; the",
        f"committed artifacts' test split, {report['test_chars']:,} characters, in segments of {EVAL_SEGMENT:,} from",
        f"the start symbol; training's own evaluation gave {report['metrics_json_test_bpc']:.5f}).",
        "",
        "| weights | test bits/char, scored | stepped | 100-char prompt ms | 8 prompts ms | step us, batch 1 "
        "| batch 8 | batch 32 |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {n} | {r['test_bpc_scored']:.5f} | {r['test_bpc_stepped']:.5f} | {r['prefill_ms_100x1']} | "
            f"{r['prefill_ms_100x8']} | {r['step_us_batch1']} | {r['step_us_batch8']} | {r['step_us_batch32']} |"
            for n, r in rows.items()
        ),
        f"| int8 (dynamic, not served) | {int8['test_bpc']:.5f} | | | | | | |",
        "",
        "'Scored' is the path of prompts and /v1/score (oneDNN's LSTM layer over whole sequences); 'stepped' "
        "feeds every character through the decode step.",
        "",
        f"bfloat16 changes held-out bits per character by {report['bfloat16_bpc_change_percent']['scored']:+.3f} % "
        f"scored and {report['bfloat16_bpc_change_percent']['stepped']:+.3f} % stepped. A character's "
        f"log-probability differs from float32's by at most {scored_drift['max']:.4f} nats scored (median "
        f"{scored_drift['median']:.1e}) and {stepped_drift['max']:.4f} stepped (median "
        f"{stepped_drift['median']:.1e}). Speed-ups over float32: "
        f"{report['bfloat16_speedup']}.",
        "",
        f"int8 (torch.ao dynamic quantization of the LSTM and the head; fbgemm): held-out bits per character "
        f"{report['int8_bpc_change_percent']:+.3f} % against float32, a character's log-probability off by up to "
        f"{int8['logprob_abs_diff_nats']['max']} nats (median {int8['logprob_abs_diff_nats']['median']:.1e}). "
        f"The decode step's largest matmul (2048 x 1024), microseconds: {int8['matmul_us_2048x1024']}. A row's "
        f"result is the same whatever the other rows of its batch: {int8['rows_independent']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
