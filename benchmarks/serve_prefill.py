"""The chunked prefill suite of `python -m benchmarks.serve --suite prefill`: 32 streams run on one
worker, then a 4,096-character prompt arrives; how long the streams' gaps between chunks grow while it
is encoded, with chunked prefill and without, round after round: prefill.json, prefill.md."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from typing import Any

import aiohttp

from benchmarks.common import SOURCE, machine, percentile, unique_tag, utc_now, window, write_report
from benchmarks.loadgen import Server, running


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
    return gaps(arrivals, sent, settle, first)


def gaps(arrivals: list[list[float]], sent: float, settle: float, first: float) -> dict[str, Any]:
    """The p99 of the streams' gaps between chunks before the long prompt (steady) and while it is encoded
    (during), the longest gap while it is encoded, and its time to first character."""
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
    with running(servers):
        tag = int(time.time())
        for _ in range(args.repeats):
            for name, server in servers.items():
                tag += 1
                rounds[name].append(asyncio.run(prefill_round(server.base, 32, 1.0, tag)))
                print(f"  prefill {name}: {rounds[name][-1]}", flush=True)
    summary = {
        name: {key: round(statistics.median(r[key] for r in runs), 1) for key in runs[0]}
        for name, runs in rounds.items()
    }
    table = markdown(summary, args, chunk.get("PREFILL_CHUNK_CHARS", "default"))
    write_report(args.out, "prefill", {"rounds": rounds, "summary": summary}, table)


def markdown(summary: dict[str, dict[str, float]], args: argparse.Namespace, chunk: str) -> str:
    """The table; `chunk`: PREFILL_CHUNK_CHARS on the chunked side."""
    lines = [
        f"Measured {utc_now()} on {machine()} with "
        f"`python -m benchmarks.serve --suite prefill --repeats {args.repeats}"
        + ("" if args.prefill_chunk is None else f" --prefill-chunk {args.prefill_chunk}")
        + "`: one worker, 32 streams, then a 4,096-character prompt (medians of the rounds; chunked: "
        + f"PREFILL_CHUNK_CHARS={chunk}, whole: 0).",
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
    return "\n".join(lines) + "\n"
