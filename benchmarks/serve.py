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
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import itertools
import json
import os
import platform
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import torch

from benchmarks.servers import start_gunicorn, stop
from seqmodels.artifacts import load_artifacts
from service.batching import DecodeBatch, GenerationRequest, Job
from service.engine import Engine, EngineOptions
from service.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts"
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


@dataclass
class Scenario:
    name: str
    method: str
    path: str
    body: Callable[[int], dict[str, Any]] | None  # the body of request number n
    concurrency: int
    stream: bool = False
    conversation: Conversation | None = None  # each client's request follows from its previous answer


class Conversation:
    """Per client, a chat that grows by one turn per request: the previous prompt, the reply the server
    streamed to it, then a new line; it starts over (with a new opening, so that no two conversations
    share a prefix) before it would pass `limit` characters."""

    def __init__(self, reply_chars: int, first: int = 0, limit: int = 3500) -> None:
        """`first`: the number of its first conversation; runs on one server need ranges of their own."""
        self.reply_chars, self.limit = reply_chars, limit
        self.history: dict[int, str] = {}
        self.started = itertools.count(first)

    def body(self, client: int, number: int) -> dict[str, Any]:
        history = self.history.get(client, "")
        turn = f"\nHAMLET. {unique_tag(number, 4)} {window(number * 37, 55)}\nHORATIO."
        if not history or len(history) + len(turn) + self.reply_chars > self.limit:
            number = next(self.started)
            history = f"{unique_tag(number, 6)} {window(number * 53, 33)}\n"  # an opening of its own
        self.history[client] = history + turn
        return {"prompt": self.history[client], "max_tokens": self.reply_chars, "temperature": 0.8,
                "seed": number, "stream": True}  # fmt: skip

    def reply(self, client: int, text: str) -> None:
        self.history[client] += text


@dataclass
class Result:
    scenario: str
    batching: bool
    concurrency: int
    seconds: float
    requests: int
    errors: int
    error_kinds: dict[str, int]
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    chars_per_s: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    server_cpu_percent: float = 0.0  # of one core; the machine has os.cpu_count() of them
    client_cpu_percent: float = 0.0
    worker_rss_mib: list[float] = field(default_factory=list)
    worker_pss_mib: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# --------------------------------------------------------------------------- the server


class Server:
    def __init__(self, batching: bool, precision: str = "auto", **env: str) -> None:
        self.env = {"WORKERS": os.environ.get("WORKERS", "2"), "MAX_TOKENS": "1024", **env}
        self.proc, self.base = start_gunicorn(
            ARTIFACTS, BATCHING="1" if batching else "0", PRECISION=precision, LOG_LEVEL="WARNING", **self.env
        )
        self.port = int(self.base.rsplit(":", 1)[1])
        self.master = psutil.Process(self.proc.pid)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.proc.output()}")
            try:
                with urllib.request.urlopen(f"{self.base}/readyz", timeout=2) as response:
                    if response.status == 200 and len(self.master.children()) >= int(self.env["WORKERS"]):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("gunicorn did not become ready")

    def processes(self) -> list[psutil.Process]:
        return [self.master, *self.master.children(recursive=True)]

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.processes():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def worker_memory(self) -> tuple[list[float], list[float]]:
        rss, pss = [], []
        for proc in self.master.children():
            info = proc.memory_full_info()
            rss.append(round(info.rss / 2**20, 1))
            pss.append(round(info.pss / 2**20, 1))
        return rss, pss

    def stop(self) -> None:
        stop(self.proc)


# --------------------------------------------------------------------------- the client


async def drive(
    base: str,
    scenario: Scenario,
    seconds: float,
    cpu: Callable[[], tuple[float, float]],
    headers: dict[str, str] | None = None,
) -> tuple[list[float], list[float], int, dict[str, int], float, tuple[float, float]]:
    """Closed-loop load: latencies (s), times to first token (s), characters received, errors by kind, wall
    time, and the change in `cpu()` (server and client CPU seconds) over the measured part.

    Each client runs without a pause from the start of the warm-up to the end; only requests it
    starts after the warm-up count. (Waiting for every warm-up request to end left connections
    idle for seconds behind slow streams, past the server's keep-alive timeout, and a request
    sent just as the server closed one failed.)"""
    latencies: list[float] = []
    first_tokens: list[float] = []
    counters = {"chars": 0}
    errors: collections.Counter[str] = collections.Counter()  # by kind
    numbers = itertools.count()
    connector = aiohttp.TCPConnector(limit=scenario.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout, headers=headers) as session:

        async def one(client: int) -> tuple[str | None, int, float | None]:
            """An error kind or None, the characters received, and the time to the first one."""
            started = time.perf_counter()
            body: dict[str, Any] | None
            if scenario.conversation is not None:
                body = scenario.conversation.body(client, next(numbers))
            else:
                body = scenario.body(next(numbers)) if scenario.body else None
            async with session.request(scenario.method, scenario.path, json=body) as response:
                if response.status != 200:
                    await response.read()
                    return f"HTTP {response.status}", 0, None
                if not scenario.stream:
                    body = await response.json()
                    return None, sum(len(c["text"]) for c in body.get("choices", [])), None
                chars, first, done, received = 0, None, False, []
                async for raw in response.content:
                    line = raw.strip()
                    done = done or line == b"data: [DONE]"
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    text = "".join(c["text"] for c in json.loads(line[6:])["choices"])
                    if text and first is None:
                        first = time.perf_counter() - started
                    chars += len(text)
                    received.append(text)
                if scenario.conversation is not None:
                    scenario.conversation.reply(client, "".join(received))
                # No [DONE]: an error event, or a stream cut short.
                return (None if done else "stream ended without [DONE]"), chars, first

        async def client(index: int, measure_from: float, until: float) -> None:
            while (started := time.perf_counter()) < until:
                try:
                    error, chars, first = await one(index)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    error, chars, first = f"{type(exc).__name__}: {exc}"[:120], 0, None
                if started < measure_from:
                    continue
                counters["chars"] += chars
                if error:
                    errors[error] += 1
                    continue
                latencies.append(time.perf_counter() - started)
                if first is not None:
                    first_tokens.append(first)

        warm_up = min(1.0, seconds / 4)
        measure_from = time.perf_counter() + warm_up
        until = measure_from + seconds
        snapshots: list[tuple[float, float]] = []
        asyncio.get_running_loop().call_later(warm_up, lambda: snapshots.append(cpu()))
        await asyncio.gather(*(client(i, measure_from, until) for i in range(scenario.concurrency)))
        wall = time.perf_counter() - measure_from
        cpu_after = cpu()
    used = (cpu_after[0] - snapshots[0][0], cpu_after[1] - snapshots[0][1])
    return latencies, first_tokens, counters["chars"], dict(errors), wall, used


def measure(server: Server, scenario: Scenario, batching: bool, seconds: float) -> Result:
    me = psutil.Process()

    def cpu() -> tuple[float, float]:
        return server.cpu_seconds(), sum(me.cpu_times()[:2])

    latencies, first_tokens, chars, errors, wall, (server_cpu, client_cpu) = asyncio.run(
        drive(server.base, scenario, seconds, cpu)
    )
    rss, pss = server.worker_memory()
    ms = [x * 1000 for x in latencies]
    result = Result(
        scenario=scenario.name,
        batching=batching,
        concurrency=scenario.concurrency,
        seconds=round(wall, 2),
        requests=len(latencies),
        errors=sum(errors.values()),
        error_kinds=errors,
        requests_per_s=round(len(latencies) / wall, 1),
        p50_ms=round(percentile(ms, 50), 2),
        p95_ms=round(percentile(ms, 95), 2),
        p99_ms=round(percentile(ms, 99), 2),
        chars_per_s=round(chars / wall, 1) if chars else None,
        ttft_p50_ms=round(percentile([x * 1000 for x in first_tokens], 50), 2) if first_tokens else None,
        ttft_p95_ms=round(percentile([x * 1000 for x in first_tokens], 95), 2) if first_tokens else None,
        server_cpu_percent=round(100 * server_cpu / wall, 1),
        client_cpu_percent=round(100 * client_cpu / wall, 1),
        worker_rss_mib=rss,
        worker_pss_mib=pss,
    )
    print(
        f"  {scenario.name:<28} c={scenario.concurrency:<3} {result.requests_per_s:>8.1f} req/s"
        f"  p50 {result.p50_ms:>8.2f} ms  p99 {result.p99_ms:>8.2f} ms"
        + (f"  {result.chars_per_s:>8.1f} chars/s" if result.chars_per_s else "")
        + (f"  ttft p50 {result.ttft_p50_ms:.1f} ms" if result.ttft_p50_ms else "")
        + f"  cpu {result.server_cpu_percent}% (client {result.client_cpu_percent}%)"
        + f"  errors {result.errors} {errors or ''}",
        flush=True,
    )
    return result


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


# --------------------------------------------------------------------------- in-process ceilings


def write_report(folder: Path, stem: str, report: dict[str, Any], table: str) -> None:
    """`stem`.json and `stem`.md in `folder`, and the table on stdout."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / f"{stem}.md").write_text(table)
    print(table)


def timed(fn: Any, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


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
        req = GenerationRequest("ROMEO.", 10**9, SamplingParams(temperature=0.8), seed=1, n=rows)
        batch.admit([Job(engine.prompt_ids("ROMEO."), req)])

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


def headline(args: argparse.Namespace) -> None:
    """The serving scenarios and their targets: results.json and results.md."""
    # Both servers run side by side (an idle one costs nothing), so that the two sides of each
    # headline ratio are measured in turn, repeat after repeat: this shared machine's speed
    # drifts by tens of percent over minutes, and pairs taken seconds apart see the same drift.
    # These requests repeat their prompts now and then ("ROMEO." for every generation): with the prefix
    # cache off, their figures stay what they measure, prompt encoding included. The cache suite
    # measures the cache, on prompts of its own.
    servers = {batching: Server(batching, args.precision, PREFIX_CACHE_MB="0") for batching in (True, False)}
    runs: dict[tuple[str, int, bool], list[Result]] = collections.defaultdict(list)
    try:
        for server in servers.values():
            server.wait_ready()
        cases = [
            (scenario, batching)
            for scenario in scenarios()
            for batching in (True, False)
            if batching or scenario.path not in ("/healthz", "/v1/score")  # neither touches the batching
        ]
        headline = [case for case in cases if (case[0].name, case[0].concurrency) in HEADLINES]
        for scenario, batching in cases:
            if (scenario, batching) not in headline:
                runs[scenario.name, scenario.concurrency, batching].append(
                    measure(servers[batching], scenario, batching, args.seconds)
                )
        for _ in range(args.repeats):
            for scenario, batching in headline:
                runs[scenario.name, scenario.concurrency, batching].append(
                    measure(servers[batching], scenario, batching, args.seconds)
                )
    finally:
        for server in servers.values():
            server.stop()
    every_run = [result for measured in runs.values() for result in measured]
    results = []  # per case, the run with the median headline figure, so the table agrees with the targets
    for scenario, batching in cases:
        measured = sorted(
            runs[scenario.name, scenario.concurrency, batching],
            key=lambda m: (m.chars_per_s or 0.0) if scenario.stream else m.requests_per_s,
        )
        results.append(measured[len(measured) // 2])
    repeats = {  # in the order measured: entry r of each list comes from the same round
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


# --------------------------------------------------------------------------- prefix cache


# A text of its own for the shared-prefix scenario (no other scenario's prompt starts with it).
SYSTEM_TEXT = (
    "CHORUS. Two households, both alike in dignity, in fair Verona, where we lay our scene, from ancient grudge "
    "break to new mutiny, where civil blood makes civil hands unclean. From forth the fatal loins of these two "
    "foes a pair of star-cross'd lovers take their life; whose misadventured piteous overthrows do with their "
    "death bury their parents' strife. The fearful passage of their death-mark'd love, and the continuance of "
    "their parents' rage, which, but their children's end, nought could remove, is now the two hours' traffic "
    "of our stage; the which if you with patient ears attend, what here shall miss, our toil shall strive to "
    "mend. SONNET. Shall I compare thee to a summer's day? Thou art more lovely and more temperate: rough winds "
    "do shake the darling buds of May, and summer's lease hath all too short a date; sometime too hot the eye "
    "of heaven shines, and often is his gold complexion dimm'd; and every fair from fair sometime declines, by "
    "chance or nature's changing course untrimm'd; but thy eternal summer shall not fade, nor lose possession "
    "of that fair thou ow'st; nor shall Death brag thou wander'st in his shade, when in eternal lines to time "
    "thou grow'st."
)[:1000]
assert len(SYSTEM_TEXT) == 1000


def unique_tag(number: int, length: int) -> str:
    """`length` letters that differ for every request number below 26 ** length (digits would all read
    as U+FFFD)."""
    letters = []
    for _ in range(length):
        number, digit = divmod(number, 26)
        letters.append(chr(ord("a") + digit))
    return "".join(letters)


def cache_scenarios() -> list[Scenario]:
    def shared(n: int) -> dict[str, Any]:
        ending = f" {unique_tag(n, 6)} {window(n, 12)}"  # 20 characters, new for every request
        return {"prompt": SYSTEM_TEXT + ending, "max_tokens": 20, "temperature": 0.8, "seed": n, "stream": True}

    def unshared(n: int) -> dict[str, Any]:
        return {"text": unique_tag(n, 6) + window(n, 94), "top_k": 5}

    out = []
    for c in (1, 8):
        out.append(Scenario("shared 1,000-char prefix, 20-char endings", "POST", "/v1/generate", shared, c, True))
        out.append(
            Scenario("conversation, +1 turn per request", "POST", "/v1/generate", None, c, True, Conversation(40))
        )
        out.append(Scenario("next-token, nothing shared (cost of misses)", "POST", "/v1/next-token", unshared, c))
    return out


def shifted(body: Callable[[int], dict[str, Any]], offset: int) -> Callable[[int], dict[str, Any]]:
    return lambda number: body(number + offset)


def cache_counters(base: str) -> dict[str, float]:
    """The prefix cache's counters from /metrics, summed over the workers."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    names = ("hits_total", "misses_total", "chars_saved_total")
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        for name in names:
            if line.startswith(f"charlm_prefix_cache_{name} "):
                out[name] += float(line.split()[-1])
    return out


def cache_suite(args: argparse.Namespace) -> None:
    """Each scenario on a server with the prefix cache (the default size) and one without, in turn,
    `--repeats` rounds; the table shows each side's median run: cache.json and cache.md."""
    servers = {on: Server(True, args.precision, PREFIX_CACHE_MB="16" if on else "0") for on in (True, False)}
    rows: list[dict[str, Any]] = []
    try:
        for server in servers.values():
            server.wait_ready()
        offsets = itertools.count(0, 1 << 20)  # every run its own request numbers: no prompt repeats another run's
        for template in cache_scenarios():
            runs: dict[bool, list[tuple[Result, dict[str, float]]]] = {True: [], False: []}
            for _ in range(args.repeats):
                for on, server in servers.items():
                    offset = next(offsets)
                    scenario = dataclasses.replace(
                        template,
                        body=None if template.body is None else shifted(template.body, offset),
                        conversation=Conversation(template.conversation.reply_chars, offset)
                        if template.conversation
                        else None,
                    )
                    before = cache_counters(server.base)
                    result = measure(server, scenario, True, args.seconds)
                    after = cache_counters(server.base)
                    runs[on].append((result, {k: after[k] - before[k] for k in after}))
            for on in (True, False):
                ordered = sorted(runs[on], key=lambda run: run[0].requests_per_s)
                result, counters = ordered[len(ordered) // 2]
                rows.append({"cache": on, **asdict(result), "cache_counters": counters})
    finally:
        for server in servers.values():
            server.stop()
    lines = [
        f"Measured {utc_now()} on {machine()} with "
        f"`python -m benchmarks.serve --suite cache --seconds {args.seconds} --repeats {args.repeats}` "
        "(two workers each; median of the rounds by req/s).",
        "",
        "| scenario | c | cache | req/s | p50 ms | p99 ms | TTFC p50 ms | TTFC p95 ms | hits | misses "
        "| chars saved | worker RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        counters = r["cache_counters"]
        lines.append(
            f"| {r['scenario']} | {r['concurrency']} | {'on' if r['cache'] else 'off'} | {r['requests_per_s']:.1f} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['ttft_p50_ms'] or ''} | {r['ttft_p95_ms'] or ''} "
            f"| {counters['hits_total']:.0f} | {counters['misses_total']:.0f} | {counters['chars_saved_total']:.0f} "
            f"| {', '.join(f'{m:.0f}' for m in r['worker_rss_mib'])} |"
        )
    write_report(args.out, "cache", {"rows": rows}, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- chunked prefill


async def prefill_round(base: str, streams: int, settle: float, tag: int) -> dict[str, Any]:
    """`streams` streams run; after `settle` s a 4,096-character prompt arrives. Returns the streams'
    gaps between chunks before it (steady state) and while it is encoded, and its time to first character."""
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=streams + 1)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as session:

        async def stream(i: int) -> None:
            body = {"prompt": window(i * 7, 20), "max_tokens": 4096, "temperature": 0.8, "seed": i, "stream": True}
            async with session.post("/v1/generate", json=body) as response:
                async for raw in response.content:
                    if raw.startswith(b"data: {"):
                        arrivals[i].append(time.perf_counter())

        tasks = [asyncio.create_task(stream(i)) for i in range(streams)]
        while not all(arrivals):
            await asyncio.sleep(0.01)
        await asyncio.sleep(settle)
        prompt = (unique_tag(tag, 8) + " " + SOURCE * 20)[:4096]  # new to the server: nothing cached
        body = {"prompt": prompt, "max_tokens": 16, "temperature": 0.8, "seed": tag, "stream": True}
        sent = time.perf_counter()
        first = None
        async with session.post("/v1/generate", json=body) as response:
            async for raw in response.content:
                if first is None and raw.startswith(b"data: {"):
                    first = time.perf_counter() - sent
        await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert first is not None, "the long prompt got no character"
    steady, during = [], []
    for times in arrivals:
        for before, after in itertools.pairwise(times):
            if sent - settle / 2 <= after < sent:  # the second half of the settling time
                steady.append(after - before)
            elif sent <= after <= sent + first + 0.05:  # ends while the long prompt is encoded
                during.append(after - before)
    return {
        "steady_p99_ms": round(1000 * percentile(steady, 99), 2),
        "during_p99_ms": round(1000 * percentile(during, 99), 2),
        "during_max_ms": round(1000 * max(during, default=float("nan")), 2),
        "long_prompt_ttfc_ms": round(1000 * first, 1),
    }


def prefill_suite(args: argparse.Namespace) -> None:
    """32 streams on one worker, then a 4,096-character prompt; PREFILL_CHUNK_CHARS at its default and 0,
    in turn, `--repeats` rounds: prefill.json and prefill.md."""
    chunk = {} if args.prefill_chunk is None else {"PREFILL_CHUNK_CHARS": str(args.prefill_chunk)}
    settings = {"chunked": chunk, "whole": {"PREFILL_CHUNK_CHARS": "0"}}
    # Every stream on the worker that encodes the long prompt, and a request thread left for it.
    env = {"WORKERS": "1", "THREADS": "40", "MAX_TOKENS": "4096"}
    servers = {name: Server(True, args.precision, **env, **extra) for name, extra in settings.items()}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    try:
        for server in servers.values():
            server.wait_ready()
        tag = int(time.time())
        for _ in range(args.repeats):
            for name, server in servers.items():
                tag += 1
                rounds[name].append(asyncio.run(prefill_round(server.base, 32, 1.0, tag)))
                print(f"  prefill {name}: {rounds[name][-1]}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    summary = {
        name: {key: round(statistics.median(r[key] for r in runs), 1) for key in runs[0]}
        for name, runs in rounds.items()
    }
    lines = [
        f"Measured {utc_now()} on {machine()} with "
        f"`python -m benchmarks.serve --suite prefill --repeats {args.repeats}"
        + ("" if args.prefill_chunk is None else f" --prefill-chunk {args.prefill_chunk}")
        + "`: one worker, 32 streams, then a 4,096-character prompt (medians of the rounds; chunked: "
        + f"PREFILL_CHUNK_CHARS={chunk.get('PREFILL_CHUNK_CHARS', 'default')}, whole: 0).",
        "",
        "| prefill | streams' steady p99 gap ms | p99 gap while it encodes ms | max gap ms | max / steady p99 "
        "| long prompt's TTFC ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['steady_p99_ms']} | {s['during_p99_ms']} | {s['during_max_ms']} "
            f"| {s['during_max_ms'] / s['steady_p99_ms']:.1f} x | {s['long_prompt_ttfc_ms']} |"
        )
    write_report(args.out, "prefill", {"rounds": rounds, "summary": summary}, "\n".join(lines) + "\n")


def utc_now() -> str:
    """The date and minute a report is stamped with."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


SUITES = {"headline": headline, "cache": cache_suite, "prefill": prefill_suite}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per scenario")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each headline scenario, and rounds of the others"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks", help="folder for the reports")
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
