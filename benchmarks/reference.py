"""The service against a plain reference server, side by side in one run, and the decode step's roofline.

    python -m benchmarks.reference [--seconds 10] [--rounds 3] [--out benchmarks]

Four servers on the committed artifacts, loopback only: the service with PRECISION=auto (bfloat16 where
the CPU has bfloat16 units) and with PRECISION=float32, 2 workers of one torch thread each (the default);
the service with PRECISION=auto as 1 worker of 2 torch threads (64 request threads); and the plain
reference (`benchmarks/reference_server.py`: Flask and `torch.nn.LSTM` in float32, 2 workers, no project
code). Each takes
closed-loop next-token clients at 1, 8 and 64 at once, every request with a 100-character prompt that no
other request shares (so no cache helps), for `--seconds` per level; the servers take turns within each
of `--rounds` rounds, and the figures are medians over the rounds. Reported: p50 at 1 client, throughput
at 8 and 64, and the ratios to the reference.

Then, on the service alone: five 3,000-character prompts, each sent twice on a new connection, as clients
without keep-alive send them (the second may land on the other worker); the ratio of first to repeat time.

Last, with the servers stopped, the decode step's roofline on one thread: the bytes of weights each
step reads in each precision, steps per second at batch 1 and 8, and this machine's single-core memory
bandwidth (a copy of 256 MiB), so how close each precision comes to its memory-bound limit. Writes
reference.json and reference.md into `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    ARTIFACTS,
    REPO,
    RESULTS,
    cpu_name,
    machine,
    percentile,
    unique_tag,
    utc_now,
    window,
    write_report,
)
from benchmarks.loadgen import exchange, next_token_clients
from benchmarks.servers import GunicornProcess, free_port, start_gunicorn, stop, wait_until_up
from seqmodels.artifacts import load_artifacts
from service.engine.lstm_kernels import FusedStep, choose_precision

LEVELS = (1, 8, 64)
ONE_WORKER = "service, PRECISION=auto, 1 worker x 2 torch threads"
REPEAT_CHARS = 3000


def start_reference() -> tuple[GunicornProcess, str]:
    port = free_port()
    gunicorn = Path(sys.executable).with_name("gunicorn")
    env = {**os.environ, "ARTIFACTS_DIR": str(ARTIFACTS), "PYTHONPATH": str(REPO)}
    log = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - closed by stop()
    args = [str(gunicorn), "-w", "2", "-b", f"127.0.0.1:{port}", "benchmarks.reference_server:app"]
    # Run from elsewhere: gunicorn reads ./gunicorn.conf.py by default, and the reference uses none.
    return GunicornProcess(args, log, cwd=tempfile.gettempdir(), env=env), f"http://127.0.0.1:{port}"


def wait_healthy(proc: GunicornProcess, base: str) -> None:
    wait_until_up(proc, base, "/healthz")
    time.sleep(1.0)  # the second worker is up too


def level(base: str, clients: int, seconds: float) -> dict[str, float]:
    load = asyncio.run(next_token_clients(base, clients, seconds))
    ms = [x * 1000 for x in load.ok_latencies]
    failed = sum(n for status, n in load.statuses.items() if status != "200")
    return {"per_s": len(ms) / seconds, "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "failed": failed}


def repeated_prompts(base: str, count: int = 5) -> dict[str, Any]:
    """Each of `count` long prompts twice, each time on a new connection: seconds of the first and the repeat."""
    port = int(base.rsplit(":", 1)[1])
    firsts, repeats, same = [], [], True
    for number in range(count):
        filler = "".join(window(number * 37 + k * 101, 400) for k in range(REPEAT_CHARS // 400 + 1))
        text = unique_tag(10_000 + number, 8) + filler[: REPEAT_CHARS - 8]
        answers = []
        for _ in range(2):
            status, body, seconds = asyncio.run(exchange(port, "POST", "/v1/next-token", {"text": text}))
            assert status == 200, body
            answers.append((body, seconds))
        firsts.append(answers[0][1])
        repeats.append(answers[1][1])
        same &= answers[0][0] == answers[1][0]
    ratios = [a / b for a, b in zip(firsts, repeats, strict=True)]
    return {
        "first_ms": round(1000 * statistics.median(firsts), 1),
        "repeat_ms": round(1000 * statistics.median(repeats), 1),
        "speedup_median": round(statistics.median(ratios), 2),
        "speedups": [round(r, 2) for r in ratios],
        "same_answers": same,
    }


def p50_after_scoring(base: str, seconds: float) -> float:
    """1-client next-token p50 (ms) after a few /v1/score requests: scoring runs on other threads than
    the scheduler's, which must not slow its prompt encoding afterwards (see `off_the_scheduler`)."""
    port = int(base.rsplit(":", 1)[1])
    for number in range(3):
        texts = [window(number * 7 + k, 200) for k in range(8)]
        status, body, _ = asyncio.run(exchange(port, "POST", "/v1/score", {"texts": texts}))
        assert status == 200, body
    return level(base, 1, seconds)["p50_ms"]


def read_bandwidth_gb_s(nbytes: int) -> float:
    """Bytes per second one thread reads from a buffer of `nbytes` (summing it, reread 8 times a sample,
    median of 5 samples): from memory for a large buffer, from the caches for one that fits in them."""
    buffer = torch.ones(nbytes // 4)
    buffer.sum()
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(8):
            buffer.sum()
        samples.append((time.perf_counter() - started) / 8)
    return nbytes / statistics.median(samples) / 1e9


def weight_bytes(kernel: FusedStep, dtype: torch.dtype) -> int:
    """Bytes of weights one decode step reads: the recurrent matmuls in `dtype`, the head in float32 (the
    input table's row per sequence is negligible)."""
    size, layers = kernel.hidden_size, kernel.lm.config.num_layers
    recurrent = 4 * size * size + (layers - 1) * 4 * size * 2 * size
    head = kernel.lm.config.vocab_size * size
    return recurrent * torch.tensor([], dtype=dtype).element_size() + head * 4


@torch.inference_mode()
def roofline() -> dict[str, Any]:
    torch.set_num_threads(1)
    models = load_artifacts(ARTIFACTS)
    layers, size = models.lm.config.num_layers, models.lm.config.hidden_size
    memory = read_bandwidth_gb_s(512 << 20)
    rows: dict[str, Any] = {"memory_read_gb_s": round(memory, 1)}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        kernel = FusedStep(models.lm, dtype)
        figures: dict[str, Any] = {"weight_bytes_per_step": weight_bytes(kernel, dtype)}
        # The weights are read every step, so they stay in the caches if they fit: read a buffer of their
        # size the same way, for the bandwidth a step can actually draw on.
        bandwidth = read_bandwidth_gb_s(figures["weight_bytes_per_step"])
        figures["weights_read_gb_s"] = round(bandwidth, 1)
        for batch in (1, 8):
            ids = torch.zeros(batch, dtype=torch.long)
            h, c = torch.zeros(layers, batch, size), torch.zeros(layers, batch, size)
            for _ in range(20):
                kernel(ids, h, c)
            samples = []
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(200):
                    kernel(ids, h, c)
                samples.append((time.perf_counter() - started) / 200)
            steps = 1 / statistics.median(samples)
            limit = bandwidth * 1e9 / figures["weight_bytes_per_step"]  # steps/s if reading weights were all
            figures[f"batch{batch}"] = {"steps_per_s": round(steps), "limit_steps_per_s": round(limit),
                                        "of_limit": round(steps / limit, 2)}  # fmt: skip
        rows[name] = figures
    return rows


def markdown(report: dict[str, Any]) -> str:
    names = list(report["servers"])
    med = report["medians"]
    lines = [
        "# The service against a plain reference server",
        "",
        f"`{report['command']}`, {report['when']}, on {report['machine']} ({report['cpu']}). 2 workers of one "
        "torch thread each unless named; "
        f"closed-loop next-token clients, a fresh 100-character prompt per request; {report['seconds']:g} s per "
        f"level, medians of {report['rounds']} interleaved rounds. PRECISION=auto chose: {report['auto_precision']}.",
        "",
        "| server | 1 client p50 ms | 8 clients req/s | 64 clients req/s | 64 clients p99 ms | failed |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        m = med[name]
        lines.append(
            f"| {name} | {m['1']['p50_ms']:.1f} | {m['8']['per_s']:.0f} | {m['64']['per_s']:.0f} | "
            f"{m['64']['p99_ms']:.0f} | {sum(m[str(n)]['failed'] for n in LEVELS)} |"
        )
    lines += [
        "",
        "Against the reference (1 client: p50 latency ratio, lower is better; 8 and 64: throughput ratio):",
        "",
    ]
    lines += ["| server | 1 client | 8 clients | 64 clients |", "|---|---|---|---|"]
    for name, r in report["ratios"].items():
        lines.append(f"| {name} | {r['1']:.2f}x | {r['8']:.2f}x | {r['64']:.2f}x |")
    rep = report["repeat"]
    roof = report["roofline"]
    lines += [
        "",
        f"{ONE_WORKER}: 1 client p50 after three /v1/score requests, {report['one_worker_p50_after_scoring_ms']:.1f} "
        f"ms (before them, in the rounds: {med[ONE_WORKER]['1']['p50_ms']:.1f} ms).",
        "",
        f"A {REPEAT_CHARS:,}-character prompt sent again on a new connection (service, PRECISION=auto): first "
        f"{rep['first_ms']} ms, repeat {rep['repeat_ms']} ms, median speed-up {rep['speedup_median']}x "
        f"(each: {rep['speedups']}); same answers: {rep['same_answers']}.",
        "",
        f"Decode step roofline, one thread. One thread reads {roof['memory_read_gb_s']} GB/s from memory (a "
        "512 MiB buffer); the column 'read GB/s' is what it reads from a buffer the size of the step's weights, "
        "which stay in the caches from step to step.",
        "",
        "| weights | bytes per step | read GB/s | batch 1 steps/s | limit | of limit | batch 8 steps/s | of limit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("float32", "bfloat16"):
        r = roof[name]
        b1, b8 = r["batch1"], r["batch8"]
        lines.append(
            f"| {name} | {r['weight_bytes_per_step']:,} | {r['weights_read_gb_s']} | {b1['steps_per_s']:,} | "
            f"{b1['limit_steps_per_s']:,} | {b1['of_limit']:.0%} | {b8['steps_per_s']:,} | {b8['of_limit']:.0%} |"
        )
    lines += [
        "",
        "The limit is that bandwidth divided by the bytes of weights a step reads: the steps per second a step "
        "would reach if reading its weights were all it did. A batch reads them once for all its rows.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reference", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="per level and server, per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    servers: dict[str, tuple[GunicornProcess, str]] = {}
    try:
        servers["service, PRECISION=auto"] = start_gunicorn(ARTIFACTS, PRECISION="auto", LOG_LEVEL="WARNING")
        servers["service, PRECISION=float32"] = start_gunicorn(ARTIFACTS, PRECISION="float32", LOG_LEVEL="WARNING")
        servers[ONE_WORKER] = start_gunicorn(
            ARTIFACTS, PRECISION="auto", LOG_LEVEL="WARNING", WORKERS="1", TORCH_THREADS="2", THREADS="64"
        )
        servers["reference (Flask + nn.LSTM, float32)"] = start_reference()
        for proc, base in servers.values():
            wait_healthy(proc, base)
        rounds: dict[str, dict[str, list[dict[str, float]]]] = {name: {} for name in servers}
        for number in range(args.rounds):
            for clients in LEVELS:
                for name, (_, base) in servers.items():
                    figures = level(base, clients, args.seconds)
                    rounds[name].setdefault(str(clients), []).append(figures)
                    print(f"round {number + 1} {name} {clients} clients: {figures}", flush=True)
        repeat = repeated_prompts(servers["service, PRECISION=auto"][1])
        after_scoring = p50_after_scoring(servers[ONE_WORKER][1], args.seconds)
    finally:
        for proc, _ in servers.values():
            stop(proc)
    medians = {
        name: {n: {k: statistics.median(f[k] for f in runs) for k in runs[0]} for n, runs in levels.items()}
        for name, levels in rounds.items()
    }
    reference = medians["reference (Flask + nn.LSTM, float32)"]
    ratios = {
        name: {
            "1": m["1"]["p50_ms"] / reference["1"]["p50_ms"],
            "8": m["8"]["per_s"] / reference["8"]["per_s"],
            "64": m["64"]["per_s"] / reference["64"]["per_s"],
        }
        for name, m in medians.items()
        if name.startswith("service")
    }
    report = {
        "command": "python -m benchmarks.reference"
        + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
        "when": utc_now(),
        "machine": machine(),
        "cpu": cpu_name(),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "auto_precision": "{} ({})".format(*choose_precision("auto")).replace("torch.", ""),
        "servers": list(servers),
        "per_round": rounds,
        "medians": medians,
        "ratios": ratios,
        "repeat": repeat,
        "one_worker_p50_after_scoring_ms": after_scoring,
        "roofline": roofline(),
    }
    write_report(args.out, "reference", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
