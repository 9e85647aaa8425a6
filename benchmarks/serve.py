"""Serving benchmark: the shipped gunicorn server, the committed artifacts, loopback only.

    python -m benchmarks.serve [--seconds 8] [--repeats 3] [--out benchmarks] [--suite headline|cache|prefill]

It starts `gunicorn -c gunicorn.conf.py` twice, side by side (BATCHING=1 and BATCHING=0),
drives each scenario from this process with an asyncio client (aiohttp; closed loop: each of C
clients sends its next request when the previous answer is complete), measures the server's
CPU use and each worker's memory with psutil, then measures in-process ceilings with the
servers stopped. The headline scenarios run in `--repeats` rounds, each round measuring every
side of the target ratios in turn. It writes `results.json` and `results.md` into `--out`.

`--suite cache` compares a server with the prefix cache and one without on prompts of their own
(a shared 1,000-character prefix; a conversation growing by a turn per request; a control with
nothing shared): `cache.json`, `cache.md`. `--suite prefill` runs 32 streams on one worker, then
sends a 4,096-character prompt, with chunked prefill and without: `prefill.json`, `prefill.md`.

This module holds the headline suite and the command line; the load generator is benchmarks.loadgen,
the other suites benchmarks.serve_cache and benchmarks.serve_prefill.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ARTIFACTS, PROMPT_100, RESULTS, machine, timed, utc_now, window, write_report
from benchmarks.loadgen import Result, Scenario, Server, measure, running
from benchmarks.serve_cache import cache_suite
from benchmarks.serve_prefill import prefill_suite
from seqmodels.artifacts import load_artifacts
from service.engine.decode_batch import DecodeBatch
from service.engine.engine import Engine, EngineOptions
from service.engine.jobs import Job
from service.engine.sampling import SamplingParams
from service.engine.types import GenerationRequest

# --------------------------------------------------------------------------- the scenarios


def scenarios() -> list[Scenario]:
    def next_token(n: int) -> dict[str, Any]:
        return {"text": window(n, 100), "top_k": 5}

    def score(n: int) -> dict[str, Any]:
        return {"texts": [window(16 * n + i, 200) for i in range(16)]}

    def generate(n: int) -> dict[str, Any]:
        return {"prompt": "ROMEO.", "max_tokens": 200, "temperature": 0.8, "seed": n, "stream": True}

    out = [Scenario("no-op (GET /healthz)", "GET", "/healthz", None, c) for c in (1, 8, 32)]
    out += [Scenario("next-token, 100-char prompt", "POST", "/v1/next-token", next_token, c) for c in (1, 8, 32)]
    out += [Scenario("score, 16 x 200 chars", "POST", "/v1/score", score, c) for c in (1, 8)]
    out += [Scenario("generate 200 chars, streams", "POST", "/v1/generate", generate, c, stream=True) for c in (1, 32)]
    return out


HEADLINES = {
    ("next-token, 100-char prompt", 8),
    ("generate 200 chars, streams", 32),
    ("generate 200 chars, streams", 1),
}

Case = tuple[Scenario, bool]  # a scenario, and whether the server it runs on batches
Runs = dict[tuple[str, int, bool], list[Result]]  # by scenario name, concurrency and batching, in order


def batching_cases() -> list[Case]:
    """Every scenario with batching on, and with it off too where the scenario touches the batching."""
    return [
        (scenario, batching)
        for scenario in scenarios()
        for batching in (True, False)
        if batching or scenario.path not in ("/healthz", "/v1/score")  # neither touches the batching
    ]


def run_cases(servers: dict[bool, Server], cases: list[Case], seconds: float, repeats: int) -> Runs:
    """Each case once, then the headline cases in `repeats` rounds, each round measuring every side of the
    target ratios in turn."""
    runs: Runs = collections.defaultdict(list)
    headline = [case for case in cases if (case[0].name, case[0].concurrency) in HEADLINES]
    others = [case for case in cases if case not in headline]
    for scenario, batching in others + headline * repeats:
        runs[scenario.name, scenario.concurrency, batching].append(
            measure(servers[batching], scenario, batching, seconds)
        )
    return runs


def median_runs(runs: Runs, cases: list[Case]) -> list[Result]:
    """Per case, the run with the median headline figure (chars/s for streams, req/s otherwise), so that
    the table agrees with the targets."""
    results = []
    for scenario, batching in cases:
        measured = sorted(
            runs[scenario.name, scenario.concurrency, batching],
            key=lambda m: (m.chars_per_s or 0.0) if scenario.stream else m.requests_per_s,
        )
        results.append(measured[len(measured) // 2])
    return results


def repeat_values(runs: Runs) -> dict[str, list[float]]:
    """Each side of the batching targets' figures, in the order measured: entry r of each list comes from
    the same round."""
    return {
        f"{key}_{'on' if batching else 'off'}": [
            m.requests_per_s if key.startswith("next") else (m.chars_per_s or 0.0)
            for m in runs[name, concurrency, batching]
        ]
        for key, name, concurrency in (
            ("next_token_c8", "next-token, 100-char prompt", 8),
            ("generate_c32", "generate 200 chars, streams", 32),
            ("generate_c1", "generate 200 chars, streams", 1),
        )
        for batching in (True, False)
    }


# --------------------------------------------------------------------------- in-process ceilings


def in_process(seconds: float) -> dict[str, Any]:
    torch.set_num_threads(1)
    models = load_artifacts(ARTIFACTS)
    lm, vocab = models.lm, models.vocab
    engine = Engine(models, EngineOptions(batching=False))
    steps = 400
    generator = torch.Generator().manual_seed(0)

    @torch.inference_mode()
    def naive() -> None:
        """The textbook loop: nn.LSTM on one character at a time, then linear, softmax and a draw."""
        x = torch.tensor([[vocab.bos_id]])
        state = None
        for _ in range(steps):
            out, state = lm.lstm(lm.embed(x), state)
            probs = torch.softmax(lm.head(out[:, -1]), dim=-1)
            x = torch.multinomial(probs, 1, generator=generator)

    def engine_rows(rows: int) -> float:
        batch = DecodeBatch(engine.kernel, vocab.chars)
        req = GenerationRequest(
            prompt="ROMEO.", max_tokens=10**9, params=SamplingParams(temperature=0.8), seed=1, n=rows
        )
        batch.admit([Job.generation(engine.prompt_ids("ROMEO."), req)])

        def run() -> None:
            for _ in range(steps):
                batch.step()

        return timed(run, 3)

    def prefill_ms(encode: Any, prompt: str, prompts: int = 1) -> float:
        ids = [engine.prompt_ids(prompt)] * prompts
        return round(timed(torch.inference_mode()(lambda: encode(ids)), 30) * 1000, 3)

    naive_s = timed(naive, 3)
    one, many = engine_rows(1), engine_rows(32)
    short = PROMPT_100[:10]
    return {
        "naive_nn_lstm_chars_per_s": round(steps / naive_s, 1),
        "engine_batch1_chars_per_s": round(steps / one, 1),
        "engine_batch32_chars_per_s": round(32 * steps / many, 1),
        "engine_batch32_steps_per_s": round(steps / many, 1),
        "prefill_100_chars_ms": prefill_ms(engine.kernel.prefill, PROMPT_100),
        "prefill_100_chars_x4_ms": prefill_ms(engine.kernel.prefill, PROMPT_100, 4),
        "prefill_10_chars_ms": prefill_ms(engine.kernel.prefill, short),
        "prefill_10_chars_nn_lstm_ms": prefill_ms(lm.prefill, short),
        "next_token_engine_ms": round(timed(lambda: engine.next_token(PROMPT_100, 5), 50) * 1000, 3),
    }


# --------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def summarize(
    results: list[Result], every_run: list[Result], repeats: dict[str, list[float]], ceilings: dict[str, Any]
) -> dict[str, Any]:
    """The targets, from the table's runs (`results`); errors over every run, repeats included."""

    def pick(name: str, c: int, batching: bool) -> Result:
        return next(r for r in results if r.scenario == name and r.concurrency == c and r.batching == batching)

    def paired(a: str, b: str) -> dict[str, Any]:
        """The median of the per-round ratios a/b (each round measured both within seconds), their
        range, and the medians of a and b."""
        ratios = [x / y for x, y in zip(repeats[a], repeats[b], strict=True) if y]
        return {
            "ratio": round(statistics.median(ratios), 2),
            "per_round": [round(r, 2) for r in ratios],
            a: statistics.median(repeats[a]),
            b: statistics.median(repeats[b]),
        }

    nt, gen, noop = "next-token, 100-char prompt", "generate 200 chars, streams", "no-op (GET /healthz)"
    g1 = statistics.median(repeats["generate_c1_on"])
    budget = ceilings["next_token_engine_ms"] + pick(noop, 1, True).p50_ms
    return {
        "next_token_c8_batching_vs_off": {**paired("next_token_c8_on", "next_token_c8_off"), "target": 3.0},
        "generate_32_streams_vs_one": {**paired("generate_c32_on", "generate_c1_on"), "target": 10.0},
        "one_stream_vs_naive_loop": {
            "ratio": ratio(g1, ceilings["naive_nn_lstm_chars_per_s"]),
            "target": 3.0,
            "stream_chars_per_s": g1,
            "naive_chars_per_s": ceilings["naive_nn_lstm_chars_per_s"],
        },
        "next_token_c1_p50_vs_compute_plus_noop": {
            "ratio": ratio(pick(nt, 1, True).p50_ms, budget),
            "target": "<= 2",
            "p50_ms": pick(nt, 1, True).p50_ms,
            "compute_plus_noop_ms": round(budget, 3),
        },
        "errors": sum(r.errors for r in every_run),
        "error_kinds": dict(sum((collections.Counter(r.error_kinds) for r in every_run), collections.Counter())),
        "requests_in_every_run": sum(r.requests for r in every_run),
        "generate_c32_on_vs_off": ratio(pick(gen, 32, True).chars_per_s, pick(gen, 32, False).chars_per_s),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Measured {report['date']} on {report['machine']} with `python -m benchmarks.serve "
        f"--seconds {report['seconds']} --repeats {report['repeats']} --precision {report['precision']}`.",
        "",
        "| scenario | batching | c | req/s | p50 ms | p95 ms | p99 ms | chars/s | TTFT p50 ms | server CPU % "
        "| client CPU % | worker RSS MiB (PSS) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        mem = ", ".join(f"{a:.0f} ({b:.0f})" for a, b in zip(r["worker_rss_mib"], r["worker_pss_mib"], strict=True))
        lines.append(
            f"| {r['scenario']} | {'on' if r['batching'] else 'off'} | {r['concurrency']} "
            f"| {r['requests_per_s']:.1f} | "
            f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['chars_per_s'] or ''} | "
            f"{r['ttft_p50_ms'] or ''} | {r['server_cpu_percent']} | {r['client_cpu_percent']} | {mem} |"
        )
    c = report["in_process"]
    lines += [
        "",
        "In-process ceilings (one thread, no HTTP):",
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in c.items()),
        "",
        "Targets (the two batching ratios: the median over rounds, each round measuring both sides in turn):",
        "",
        "| target | measured | goal |",
        "|---|---|---|",
    ]
    s = report["summary"]
    lines += [
        f"| next-token c=8, batching on / off (req/s) | {s['next_token_c8_batching_vs_off']['ratio']} x "
        f"(rounds: {s['next_token_c8_batching_vs_off']['per_round']}) | >= 3 x |",
        f"| generate: 32 streams / 1 stream (chars/s) | {s['generate_32_streams_vs_one']['ratio']} x "
        f"(rounds: {s['generate_32_streams_vs_one']['per_round']}) | >= 10 x |",
        f"| one stream / naive nn.LSTM loop (chars/s) | {s['one_stream_vs_naive_loop']['ratio']} x | >= 3 x |",
        f"| next-token c=1 p50 / (compute + no-op p50) "
        f"| {s['next_token_c1_p50_vs_compute_plus_noop']['ratio']} x | <= 2 x |",
        f"| errors, every run of every scenario ({s['requests_in_every_run']:,} requests) "
        f"| {s['errors']} {s['error_kinds'] or ''} | 0 |",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the suite


def headline(args: argparse.Namespace) -> None:
    """The serving scenarios and their targets: results.json and results.md."""
    # Both servers run side by side (an idle one costs nothing), so that the two sides of each
    # headline ratio are measured in turn, repeat after repeat: this shared machine's speed
    # drifts by tens of percent over minutes, and pairs taken seconds apart see the same drift.
    # These requests repeat their prompts now and then ("ROMEO." for every generation): with the prefix
    # cache off, their figures stay what they measure, prompt encoding included. The cache suite
    # measures the cache, on prompts of its own.
    cases = batching_cases()
    servers = {batching: Server(batching, args.precision, PREFIX_CACHE_MB="0") for batching in (True, False)}
    with running(servers):
        runs = run_cases(servers, cases, args.seconds, args.repeats)
    every_run = [result for measured in runs.values() for result in measured]
    results = median_runs(runs, cases)
    repeats = repeat_values(runs)
    print("in-process ceilings", flush=True)
    ceilings = in_process(args.seconds)
    print(json.dumps(ceilings, indent=1), flush=True)
    report = {
        "date": utc_now(),
        "machine": machine(),
        "seconds": args.seconds,
        "repeats": args.repeats,
        "precision": args.precision,
        "results": [asdict(r) for r in results],
        "repeat_values": repeats,
        "in_process": ceilings,
    }
    report["summary"] = summarize(results, every_run, repeats, ceilings)
    write_report(args.out, "results", report, markdown(report))


# --------------------------------------------------------------------------- the command line

SUITES = {"headline": headline, "cache": cache_suite, "prefill": prefill_suite}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per scenario")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each headline scenario, and rounds of the others"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the reports")
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "float32", "bfloat16"], help="the servers' PRECISION"
    )
    parser.add_argument(
        "--suite",
        action="append",
        choices=sorted(SUITES),
        help="headline (results.*), cache (cache.*: prefix cache on and off), prefill (prefill.*: chunked "
        "prefill on and off); repeat to run several; default: all three",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        help="PREFILL_CHUNK_CHARS on the chunked side of the prefill suite (default: its default)",
    )
    args = parser.parse_args(argv)
    for name in args.suite or list(SUITES):
        SUITES[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
