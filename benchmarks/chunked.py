"""What a chunked body costs the worker that reads it, against the same body with Content-Length.

    python -m benchmarks.chunked [--rounds 5] [--requests 30] [--out benchmarks]

Starts the shipped server with one worker and the committed artifacts, then, `--rounds` times, sends
`--requests` POST /v1/score requests on one keep-alive connection with a 1 MiB body (a short JSON
request padded with spaces) framed by Content-Length, and as many with the same body in 100-byte
chunks, and reads the worker's CPU time (user + system, psutil) before and after each run. Also times
service.server.request_framing's parsing of either request fed in-process, 64 KiB at a time as the loop reads it.
Prints the medians and the ratio, and writes chunked.json and chunked.md into `--out`.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from gunicorn.config import Config

from benchmarks.common import RESULTS, cpu_name, machine, utc_now, write_report
from benchmarks.loadgen import Server
from service.server.request_framing import Limits, PendingRequest

BODY = json.dumps({"texts": ["To be, or not to be"]}).encode().ljust(1 << 20)
CHUNK = 100
HEAD = b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
REQUESTS = {
    "content_length": HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY,
    "chunked_100": HEAD
    + b"Transfer-Encoding: chunked\r\n\r\n"
    + b"".join(b"%x\r\n%s\r\n" % (len(BODY[i : i + CHUNK]), BODY[i : i + CHUNK]) for i in range(0, len(BODY), CHUNK))
    + b"0\r\n\r\n",
}
READ_SIZE = 1 << 16  # as service.server.worker reads


def answer(sock: socket.socket) -> int:
    """Read one answer (its Content-Length body included); its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(1 << 16)
    return int(head.split(b" ")[1])


def worker_cpu(worker: psutil.Process) -> float:
    times = worker.cpu_times()
    return float(times.user + times.system)


def served(port: int, worker: psutil.Process, raw: bytes, requests: int) -> float:
    """Worker CPU seconds per request over `requests` of `raw` on one connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(raw)  # a warm-up request, and the connection is the worker's
        assert answer(sock) == 200
        before = worker_cpu(worker)
        for _ in range(requests):
            sock.sendall(raw)
            assert answer(sock) == 200
        return (worker_cpu(worker) - before) / requests


def parsed(raw: bytes) -> float:
    """Seconds service.server.request_framing takes to read `raw`, fed as the loop reads it."""
    limits = Limits(max_header_bytes=32 << 10, max_request_line=4094, max_field_bytes=8190, max_fields=100,
                    max_body_bytes=1 << 20)  # fmt: skip
    pending = PendingRequest(limits, 0.0, Config(), ("127.0.0.1", 0))
    started = time.perf_counter()
    for i in range(0, len(raw), READ_SIZE):
        complete = pending.feed(raw[i : i + READ_SIZE], 0.0)
    assert complete and pending.body_bytes == len(BODY)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=30, help="per body and round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cpu: dict[str, list[float]] = {name: [] for name in REQUESTS}
    parse: dict[str, list[float]] = {name: [] for name in REQUESTS}
    server = Server(batching=True, WORKERS="1")
    try:
        server.wait_ready()
        (worker,) = server.master.children()
        for _ in range(args.rounds):  # the two bodies in turn, so that drift in the machine's speed hits both
            for name, raw in REQUESTS.items():
                cpu[name].append(served(server.port, worker, raw, args.requests))
                parse[name].append(parsed(raw))
    finally:
        server.stop()
    medians: dict[str, dict[str, Any]] = {
        name: {
            "encoded_bytes": len(REQUESTS[name]),
            "worker_cpu_ms": round(statistics.median(cpu[name]) * 1000, 2),
            "parse_ms": round(statistics.median(parse[name]) * 1000, 2),
            "rounds_worker_cpu_ms": [round(x * 1000, 2) for x in cpu[name]],
            "rounds_parse_ms": [round(x * 1000, 2) for x in parse[name]],
        }
        for name in REQUESTS
    }
    ratio = {key: medians["chunked_100"][key] / medians["content_length"][key] for key in ("worker_cpu_ms", "parse_ms")}
    report = {
        "date": utc_now(),
        "machine": machine(),
        "cpu": cpu_name(),
        "arguments": " ".join(argv if argv is not None else sys.argv[1:]),
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "bodies": medians,
        "chunked_over_content_length": ratio,
    }
    lines = [
        "# Chunked bodies: what reading one costs the worker",
        "",
        f"`python -m benchmarks.chunked {report['arguments']}`, {report['date']}, on {report['machine']} "
        f"({report['cpu']}). One worker, the committed artifacts, loopback: POST /v1/score with a 1 MiB body "
        f"(a short request padded with spaces), {args.requests} requests per round on one keep-alive connection, "
        f"{args.rounds} rounds, medians. Worker CPU: user + system time of the worker process per request, the "
        "app's scoring included; parse: service.server.request_framing reading the request in-process, 64 KiB "
        "at a time.",
        "",
        "| body | bytes on the wire | worker CPU ms per request | parse ms |",
        "|---|---|---|---|",
    ]
    for name, row in medians.items():
        label = "Content-Length" if name == "content_length" else f"chunked, {CHUNK}-byte chunks"
        lines.append(f"| {label} | {row['encoded_bytes']:,} | {row['worker_cpu_ms']} | {row['parse_ms']} |")
    lines += [
        "",
        f"Chunked over Content-Length: worker CPU {ratio['worker_cpu_ms']:.2f} x, parse {ratio['parse_ms']:.2f} x.",
    ]
    write_report(args.out, "chunked", report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
