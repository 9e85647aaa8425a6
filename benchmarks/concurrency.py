"""The service against LitServe at real concurrency, its encoder in isolation, and 64 streams at once.

    python -m benchmarks.concurrency [--seconds 10] [--rounds 2] [--levels 1 64 256 1024] [--out benchmarks]

Two servers on the committed artifacts, loopback only, taking turns within each of `--rounds` rounds: the
service as shipped (`gunicorn -c gunicorn.conf.py`, 2 workers), and LitServe as its documentation suggests
(`benchmarks/litserve_server.py`: a plain `nn.LSTM` in bfloat16, dynamic batching of 64, 2 workers; pinned
in the `bench` extra). At each level, wrk (Debian's package; `apt-get install wrk`) runs that many
closed-loop clients for `--seconds`, each request a next-token with a 100-character prompt no other request
shares (`benchmarks/wrk_next_token.lua`); wrk retries at once after a 503, as a client that ignores
Retry-After does. Reported per level, medians over the rounds: answers per second, goodput (200s per
second), the share refused, and p50 and p99 of every answer.

Then, with the servers stopped, on one torch thread: the prompt encoder in isolation, prompts per second
per core at batch 1, 8, 32 and 64 for the service's encoder (`FusedStep.prefill`) and for one `nn.LSTM`
call over the same batch in the same precision; and the generation side: the aggregate characters per
second of 64 concurrent streams of 200 characters against the service, beside 64 divided by the isolated
time of one batch-64 decode step (on one core, so the bound for 2 workers is twice it). Writes
concurrency.json, concurrency.md and a plot of goodput and p99 against clients (docs/plots/concurrency.png).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import torch

from benchmarks.common import ARTIFACTS, REPO, RESULTS, cpu_name, machine, utc_now, window, write_report
from benchmarks.servers import GunicornProcess, free_port, start_checkout, start_gunicorn, stop, wait_until_up
from seqmodels.artifacts import load_artifacts
from service.engine.lstm_kernels import FusedStep, choose_precision

LEVELS = (1, 64, 256, 1024)
SERVERS = ("service", "LitServe (bf16, batch 64)")
SCRIPT = REPO / "benchmarks" / "wrk_next_token.lua"
PLOT = REPO / "docs" / "plots" / "concurrency.png"
BATCHES = (1, 8, 32, 64)
STREAMS, STREAM_CHARS = 64, 200
DURATION = re.compile(r"([\d.]+)(us|ms|s|m)")


def start_litserve() -> tuple[GunicornProcess, str]:
    port = free_port()
    env = {**os.environ, "ARTIFACTS_DIR": str(ARTIFACTS), "LITSERVE_PORT": str(port), "PYTHONPATH": str(REPO)}
    log = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - closed by stop()
    args = [sys.executable, "-m", "benchmarks.litserve_server"]
    # A session of its own: LitServe's worker processes are stopped with it (stop_peer), not left running.
    return GunicornProcess(args, log, cwd=REPO, env=env, start_new_session=True), f"http://127.0.0.1:{port}"


def stop_peer(proc: GunicornProcess) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    stop(proc)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


BASELINE = "service at the baseline checkout"


def start(name: str, baseline: Path | None = None) -> tuple[GunicornProcess, str]:
    if name in (SERVERS[0], BASELINE):
        if name == BASELINE and baseline is not None:
            proc, base = start_checkout(baseline, ARTIFACTS, LOG_LEVEL="WARNING")
        else:
            proc, base = start_gunicorn(ARTIFACTS, LOG_LEVEL="WARNING")
        wait_until_up(proc, base)
    else:
        proc, base = start_litserve()
        wait_until_up(proc, base, "/healthz", limit=120)
    time.sleep(2.0)  # every worker is up
    return proc, base


def seconds_of(text: str) -> float:
    value, unit = DURATION.fullmatch(text.strip()).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


RUNS = iter(range(1, 1_000_000))  # each wrk run's prompts start elsewhere: no prefix cache helps


def wrk(base: str, clients: int, seconds: float) -> dict[str, float]:
    """One wrk run: answers, 200s and refusals per second, and p50 / p99 of every answer (ms)."""
    offset = str(next(RUNS) * 10_000_000)
    command = ["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--latency", "--timeout", "30s", "-s", str(SCRIPT)]
    out = subprocess.run(
        [*command, base, "--", offset],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    try:
        return parse_wrk(out)
    except (TypeError, AttributeError):
        raise RuntimeError(f"unexpected wrk output:\n{out}") from None


def parse_wrk(out: str) -> dict[str, float]:
    total = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    elapsed = seconds_of(re.search(r"requests in ([\d.]+\w+),", out)[1])  # type: ignore[index]
    refused = int(m[1]) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return {
        "answers_per_s": total / elapsed,
        "goodput_per_s": (total - refused) / elapsed,
        "refused_share": refused / total if total else 0.0,
        "socket_errors": errors,
        "p50_ms": seconds_of(re.search(r"^\s+50%\s+(\S+)\s*$", out, re.M)[1]) * 1000,  # type: ignore[index]
        "p99_ms": seconds_of(re.search(r"^\s+99%\s+(\S+)\s*$", out, re.M)[1]) * 1000,  # type: ignore[index]
    }


def servers(
    levels: list[int], seconds: float, rounds: int, baseline: Path | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    names = [*SERVERS, *([BASELINE] if baseline is not None else [])]
    runs: dict[str, dict[int, list[dict[str, float]]]] = {name: {c: [] for c in levels} for name in names}
    for _ in range(rounds):
        for name in names:
            proc, base = start(name, baseline)
            try:
                wrk(base, 8, 2.0)  # warm-up, not counted
                for clients in levels:
                    runs[name][clients].append(wrk(base, clients, seconds))
            finally:
                (stop_peer if name == SERVERS[1] else stop)(proc)
    return {
        name: {str(c): {k: statistics.median(r[k] for r in rows) for k in rows[0]} for c, rows in by_level.items()}
        for name, by_level in runs.items()
    }


def prompts_per_second(run: Any, batch: int) -> float:
    with torch.inference_mode():
        for _ in range(2):
            run()
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            run()
            samples.append(time.perf_counter() - started)
    return batch / statistics.median(samples)


def encoder(dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Prompts per second per core: the service's encoder and one nn.LSTM call, batches of 101 ids."""
    torch.set_num_threads(1)
    models = load_artifacts(ARTIFACTS)
    lm, kernel = models.lm, FusedStep(models.lm, dtype)
    config = lm.config
    rnn = torch.nn.LSTM(config.embed_dim, config.hidden_size, config.num_layers).to(dtype).eval()
    rows = {}
    for batch in BATCHES:
        sequences = [[models.vocab.bos_id, *models.vocab.encode(window(7 * i, 100))] for i in range(batch)]
        ids = torch.tensor(sequences).t()

        def plain(ids: torch.Tensor = ids) -> None:
            out, _ = rnn(lm.embed(ids).to(dtype))
            lm.head(out[-1].float())

        ours = prompts_per_second(lambda s=sequences: kernel.prefill(s), batch)
        theirs = prompts_per_second(plain, batch)
        rows[str(batch)] = {"service": ours, "nn_lstm": theirs, "ratio": ours / theirs}
    return rows


def decode_bound(dtype: torch.dtype) -> float:
    """Characters per second of one core stepping 64 rows: 64 / the median time of a batch-64 decode step."""
    torch.set_num_threads(1)
    models = load_artifacts(ARTIFACTS)
    kernel = FusedStep(models.lm, dtype)
    layers, size = models.lm.config.num_layers, models.lm.config.hidden_size
    h, c = torch.zeros(layers, STREAMS, size, dtype=dtype), torch.zeros(layers, STREAMS, size, dtype=dtype)
    ids = torch.ones(STREAMS, dtype=torch.long)
    with torch.inference_mode():
        for _ in range(20):
            kernel(ids, h, c)
        samples = []
        for _ in range(200):
            started = time.perf_counter()
            kernel(ids, h, c)
            samples.append(time.perf_counter() - started)
    return STREAMS / statistics.median(samples)


async def stream_chars_per_second() -> float:
    """64 concurrent streams of STREAM_CHARS characters against the service: characters received per second."""
    proc, base = start(SERVERS[0])
    try:
        async with aiohttp.ClientSession(base, timeout=aiohttp.ClientTimeout(total=300)) as session:

            async def one(seed: int) -> int:
                body = {"prompt": window(seed, 40), "max_tokens": STREAM_CHARS, "stream": True, "seed": seed}
                async with session.post("/v1/generate", json=body) as response:
                    raw = (await response.read()).decode()
                chunks = [json.loads(line[6:]) for line in raw.split("\n\n") if line.startswith("data: {")]
                return sum(len(c["text"]) for chunk in chunks for c in chunk.get("choices", []))

            await asyncio.gather(*(one(s) for s in range(8)))  # warm-up
            started = time.perf_counter()
            chars = await asyncio.gather(*(one(1000 + s) for s in range(STREAMS)))
            return sum(chars) / (time.perf_counter() - started)
    finally:
        stop(proc)


def plot(results: dict[str, dict[str, dict[str, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (good, tail) = plt.subplots(1, 2, figsize=(10, 4))
    for name, by_level in results.items():
        clients = [int(c) for c in by_level]
        good.plot(clients, [row["goodput_per_s"] for row in by_level.values()], marker="o", label=name)
        tail.plot(clients, [row["p99_ms"] for row in by_level.values()], marker="o", label=name)
    for axis, label in ((good, "goodput (200 answers / s)"), (tail, "p99 of every answer (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    good.legend()
    figure.suptitle(f"next-token, 100-character prompts, {cpu_name()}, 2 cores")
    figure.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(PLOT, dpi=110)


def markdown(report: dict[str, Any]) -> str:
    results, levels = report["servers"], report["levels"]
    service, peer = results[SERVERS[0]], results[SERVERS[1]]
    lines = [
        "# Concurrency: the service against LitServe",
        "",
        f"`{report['command']}`, {report['when']}, on {report['machine']} ({report['cpu']}); medians of "
        f"{report['rounds']} rounds of {report['seconds']:g} s per level, wrk with one thread, loopback.",
        "",
        "| clients | server | answers/s | goodput/s | refused | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for clients in map(str, levels):
        for name in results:
            row = results[name][clients]
            lines.append(
                f"| {clients} | {name} | {row['answers_per_s']:.0f} | {row['goodput_per_s']:.0f} | "
                f"{row['refused_share']:.0%} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} |"
            )
    lines += ["", "Goodput, the service over LitServe: " + ", ".join(
        f"{c} clients {service[str(c)]['goodput_per_s'] / peer[str(c)]['goodput_per_s']:.2f} x" for c in levels
    ) + "."]  # fmt: skip
    if BASELINE in results:
        old = results[BASELINE]
        lines.append(f"The service against the baseline checkout `{report['baseline']}`: " + ", ".join(
            f"{c} clients {service[str(c)]['goodput_per_s'] / old[str(c)]['goodput_per_s']:.2f} x goodput, "
            f"p50 {service[str(c)]['p50_ms']:.1f} against {old[str(c)]['p50_ms']:.1f} ms" for c in levels
        ) + ".")  # fmt: skip
    if "64" in service:
        base = service["64"]["goodput_per_s"]
        lines.append("The service's goodput against its own at 64 clients: " + ", ".join(
            f"{c} clients {service[str(c)]['goodput_per_s'] / base:.2f} x" for c in levels if c > 64
        ) + ".")  # fmt: skip
    if not report["encoder"]:
        return "\n".join([*lines, ""])
    lines += [
        "",
        f"## The prompt encoder alone ({report['precision']}, one thread, 101 ids a prompt)",
        "",
        "| batch | service prompts/s | nn.LSTM prompts/s | ratio |",
        "|---|---|---|---|",
    ]
    for batch, row in report["encoder"].items():
        lines.append(f"| {batch} | {row['service']:.0f} | {row['nn_lstm']:.0f} | {row['ratio']:.2f} |")
    gen = report["generation"]
    lines += [
        "",
        f"## Generation: {STREAMS} streams of {STREAM_CHARS} characters at once",
        "",
        f"Aggregate {gen['chars_per_s']:.0f} characters/s against a bound of {gen['bound_chars_per_s']:.0f} "
        f"(2 cores x 64 / one batch-64 decode step of {gen['step_ms']:.2f} ms): {gen['ratio']:.2f} x.",
        "",
        "The plot of goodput and p99 against clients is docs/plots/concurrency.png, on the performance page.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.concurrency", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per level and server")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--baseline", type=Path, help="another checkout of the service to run beside them")
    parser.add_argument("--skip-isolated", action="store_true", help="servers only: no encoder or stream figures")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install wrk", file=sys.stderr)
        return 2
    dtype, _ = choose_precision("auto")
    results = servers(args.levels, args.seconds, args.rounds, args.baseline)
    chars = 0.0 if args.skip_isolated else asyncio.run(stream_chars_per_second())
    step_bound = 1.0 if args.skip_isolated else decode_bound(dtype)
    report: dict[str, Any] = {
        "command": "python -m benchmarks.concurrency"
        + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
        "when": utc_now(),
        "machine": machine(),
        "cpu": cpu_name(),
        "precision": str(dtype).removeprefix("torch."),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "levels": args.levels,
        "servers": results,
        "baseline": str(args.baseline) if args.baseline else None,
        "encoder": {} if args.skip_isolated else encoder(dtype),
        "generation": {
            "chars_per_s": chars,
            "step_ms": STREAMS / step_bound * 1000,
            "bound_chars_per_s": 2 * step_bound,
            "ratio": chars / (2 * step_bound),
        },
    }
    stem = "concurrency_baseline" if args.baseline else "concurrency"
    if not args.skip_isolated:
        plot(results)
    write_report(args.out, stem, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
