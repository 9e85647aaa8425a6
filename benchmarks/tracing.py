"""What OpenTelemetry traces cost: goodput with tracing on, exporting spans over OTLP/HTTP to a receiver on
loopback, against tracing off, side by side.

    python -m benchmarks.tracing [--clients 8] [--seconds 8] [--rounds 4] [--out DIR]

Three gunicorn servers on the committed artifacts (2 workers each): tracing off; on with every request
traced (OTEL_TRACES_EXPORTER=otlp, the default sampler); and on with 10 % of traces sampled
(OTEL_TRACES_SAMPLER=parentbased_traceidratio, OTEL_TRACES_SAMPLER_ARG=0.1). They are up at once and loaded
in turn, in an order reversed every other round, so all see the same machine. `--clients` closed-loop
clients ask /v1/next-token, each prompt of its own, as in benchmarks.inference_protocol; the receiver
(benchmarks/otlp_receiver.py, decoding every export) runs as a process of its own, on the same cores. Reported:
medians over the rounds of goodput (200 answers per second), p50 and p99, and the spans received. Then, in
this process, what the SDK spends on one span: making and ending it (a server span's seven attributes),
and encoding it for OTLP, medians of 5 runs of 5,000. Writes tracing.json and tracing.md into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ARTIFACTS, REPO, RESULTS, phase_table, stamp, write_report
from benchmarks.inference_protocol import closed_loop, v1
from benchmarks.servers import start_gunicorn, stop, wait_until_up

PHASES = ("off", "on, every request", "on, 10 % sampled")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    # The receiver runs as a process of its own, as a collector would: in this one, its decoding would hold
    # the interpreter that the clients need.
    receiver = subprocess.Popen([sys.executable, "-m", "benchmarks.otlp_receiver"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    assert receiver.stdin is not None and receiver.stdout is not None
    endpoint = receiver.stdout.readline().strip()
    try:
        traced = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint}
        sampled = {**traced, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
        servers = {
            PHASES[0]: start_gunicorn(ARTIFACTS),
            PHASES[1]: start_gunicorn(ARTIFACTS, **traced),
            PHASES[2]: start_gunicorn(ARTIFACTS, **sampled),
        }
        rounds: dict[str, list[dict[str, float]]] = {phase: [] for phase in PHASES}
        try:
            for proc, base in servers.values():
                wait_until_up(proc, base)
            for round_number in range(args.rounds):
                for phase in PHASES if round_number % 2 == 0 else PHASES[::-1]:
                    base = servers[phase][1]
                    rounds[phase].append(asyncio.run(closed_loop(base, args.clients, args.seconds, v1)))
        finally:
            for proc, _ in servers.values():
                stop(proc)
    finally:
        receiver.stdin.close()
        spans = int(receiver.stdout.readline() or 0)
        receiver.wait(timeout=30)
    medians = {phase: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for phase, runs in rounds.items()}
    return {"phases": medians, "rounds_run": rounds, "spans_received": spans}


def span_costs(count: int = 5000, runs: int = 5) -> dict[str, float]:
    """Microseconds the SDK spends per span: making and ending one, and encoding it for OTLP."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class Keep(SpanExporter):
        def __init__(self) -> None:
            self.spans: list[ReadableSpan] = []

        def export(self, spans: Any) -> SpanExportResult:
            self.spans.extend(spans)
            return SpanExportResult.SUCCESS

    kept = Keep()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracer = provider.get_tracer("benchmarks.tracing")
    attributes = {"http.request.method": "POST", "url.path": "/v1/next-token", "url.scheme": "http",
                  "server.address": "127.0.0.1", "client.address": "127.0.0.1", "user_agent.original": "bench",
                  "http.route": "/v1/next-token"}  # fmt: skip
    make, encode = [], []
    for _ in range(runs):
        kept.spans.clear()
        started = time.perf_counter()
        for _ in range(count):
            tracer.start_span("POST /v1/next-token", attributes=attributes, start_time=time.time_ns()).end()
        make.append((time.perf_counter() - started) / count * 1e6)
        started = time.perf_counter()
        encode_spans(kept.spans).SerializeToString()
        encode.append((time.perf_counter() - started) / count * 1e6)
    return {"make_us": statistics.median(make), "encode_us": statistics.median(encode)}


def markdown(report: dict[str, Any]) -> str:
    phases = report["tracing"]["phases"]
    ratios = ", ".join(f"{p} {phases[p]['goodput'] / phases['off']['goodput']:.2f} x" for p in PHASES[1:])
    lines = [
        "# What traces cost",
        "",
        f"`{report['command']}`, {report['when']}, on {report['machine']} ({report['cpu']}); three servers of "
        "2 workers each, loopback, the OTLP receiver a process of its own.",
        "",
        f"{report['clients']} clients on /v1/next-token, medians of {report['rounds']} alternating rounds of "
        f"{report['seconds']:g} s:",
        "",
        *phase_table("tracing", phases),
        "",
        f"Goodput against tracing off: {ratios}; the receiver got {report['tracing']['spans_received']} spans.",
        "",
        f"One span costs the SDK {report['span']['make_us']:.1f} µs to make and end and "
        f"{report['span']['encode_us']:.1f} µs to encode for OTLP (in this process, on one core).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tracing", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        **stamp("benchmarks.tracing", argv),
        "clients": args.clients,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "tracing": measure(args),
        "span": span_costs(),
    }
    write_report(args.out, "tracing", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
