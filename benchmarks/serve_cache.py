"""The prefix cache suite of `python -m benchmarks.serve --suite cache`: a server with the prefix cache
and one without, on prompts of their own (a shared 1,000-character prefix; a conversation growing by a
turn per request; a control with nothing shared), in turn, round after round: cache.json, cache.md."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from benchmarks.common import machine, unique_tag, utc_now, window, write_report
from benchmarks.loadgen import Conversation, Result, Scenario, Server, measure, running

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


def renumbered(template: Scenario, offset: int) -> Scenario:
    """`template` with its request numbers (and conversations) starting at `offset`."""
    return dataclasses.replace(
        template,
        body=None if template.body is None else shifted(template.body, offset),
        conversation=Conversation(template.conversation.reply_chars, offset) if template.conversation else None,
    )


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


def measure_counted(server: Server, scenario: Scenario, seconds: float) -> tuple[Result, dict[str, float]]:
    """The run, and how much each of the cache's counters rose during it."""
    before = cache_counters(server.base)
    result = measure(server, scenario, True, seconds)
    after = cache_counters(server.base)
    return result, {k: after[k] - before[k] for k in after}


def cache_suite(args: argparse.Namespace) -> None:
    """Each scenario on a server with the prefix cache (the default size) and one without, in turn,
    `--repeats` rounds; the table shows each side's median run: cache.json and cache.md."""
    rows: list[dict[str, Any]] = []
    servers = {on: Server(True, args.precision, PREFIX_CACHE_MB="16" if on else "0") for on in (True, False)}
    with running(servers):
        offsets = itertools.count(0, 1 << 20)  # every run its own request numbers: no prompt repeats another run's
        for template in cache_scenarios():
            runs: dict[bool, list[tuple[Result, dict[str, float]]]] = {True: [], False: []}
            for _ in range(args.repeats):
                for on, server in servers.items():
                    runs[on].append(measure_counted(server, renumbered(template, next(offsets)), args.seconds))
            for on in (True, False):
                ordered = sorted(runs[on], key=lambda run: run[0].requests_per_s)
                result, counters = ordered[len(ordered) // 2]
                rows.append({"cache": on, **asdict(result), "cache_counters": counters})
    write_report(args.out, "cache", {"rows": rows}, markdown(rows, args))


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
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
    return "\n".join(lines) + "\n"
