"""The Open Inference Protocol's cost: next-token through /v2 against /v1, side by side on one server.

    python -m benchmarks.inference_protocol [--levels 1 8 64] [--seconds 6] [--rounds 3] [--out DIR]

One gunicorn server with the committed artifacts, loopback only. At each level, that many closed-loop
clients (aiohttp, each prompt of its own: 6 letters no other request shares, then 94 characters of a
play) ask for the five most likely next characters four ways, one after the other, round after round:
`/v1/next-token` with top_k 5; `/v2/models/char-lstm/infer` in JSON with `next_char_probs` and Triton's
classification parameter at 5; the same with the input and the output as binary tensors (Triton's binary
extension, as tritonclient sends by default); and the same call over gRPC (`ModelInfer`, raw tensors,
one HTTP/2 connection per client, through grpc.aio with tritonclient's messages). Reported per level and
way: goodput (200 answers per second) and p50 / p99, medians over the rounds, and /v2's goodput over
/v1's. Writes inference_protocol.json and .md into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import (
    ARTIFACTS,
    RESULTS,
    percentile,
    stamp,
    unique_tag,
    window,
    write_report,
)
from benchmarks.servers import free_port, start_gunicorn, stop, wait_until_up
from service.api.inference_protocol.tensors import decode_bytes_elements

NUMBERS = itertools.count(1_000_000)
INFER = "/v2/models/char-lstm/infer"
Request = tuple[str, bytes, dict[str, str]]  # path, body, headers


def prompt(number: int) -> str:
    return unique_tag(number, 6) + window(number, 94)


def v1(text: str) -> Request:
    body = json.dumps({"text": text, "top_k": 5}).encode()
    return "/v1/next-token", body, {"Content-Type": "application/json"}


def v2_json(text: str) -> Request:
    body = {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}],
        "outputs": [{"name": "next_char_probs", "parameters": {"classification": 5}}],
    }
    return INFER, json.dumps(body).encode(), {"Content-Type": "application/json"}


def v2_binary(text: str) -> Request:
    raw = text.encode()
    tensor = struct.pack("<I", len(raw)) + raw
    header = {
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(tensor)}}
        ],
        "outputs": [{"name": "next_char_probs", "parameters": {"classification": 5, "binary_data": True}}],
    }
    head = json.dumps(header).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    return INFER, head + tensor, headers


WAYS: dict[str, Callable[[str], Request]] = {
    "/v1 next-token": v1,
    "/v2 infer, JSON": v2_json,
    "/v2 infer, binary": v2_binary,
}
GRPC_WAY = "/v2 infer, gRPC"


def grpc_request(text: str) -> Any:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="char-lstm")
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    raw = text.encode()
    request.raw_input_contents.append(struct.pack("<I", len(raw)) + raw)
    output = request.outputs.add(name="next_char_probs")
    output.parameters["classification"].int64_param = 5
    return request


async def grpc_closed_loop(target: str, clients: int, seconds: float) -> dict[str, float]:
    """As closed_loop, over gRPC: each client with a channel of its own."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    tally = Tally(seconds)

    async def client() -> None:
        # A connection of its own: gRPC shares one between channels with the same arguments by default, which
        # would put every client on the one worker that accepted it.
        async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

            async def attempt() -> bool:
                try:
                    await stub.ModelInfer(grpc_request(prompt(next(NUMBERS))), timeout=60)
                except grpc.aio.AioRpcError:
                    return False
                return True

            await tally.loop(attempt)

    await asyncio.gather(*(client() for _ in range(clients)))
    return tally.summary()


def grpc_top(target: str, text: str) -> list[str]:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(grpc_request(text), timeout=30)
    values = decode_bytes_elements(memoryview(response.raw_output_contents[0]), 5, "next_char_probs")
    return [v.split(":", 2)[2] for v in values]


class Tally:
    """Closed-loop clients' answers over `seconds` after a 1 s warm-up: goodput, failures, p50 and p99 (ms)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.measure_from = time.monotonic() + 1.0
        self.latencies: list[float] = []
        self.failed = 0

    async def loop(self, attempt: Callable[[], Awaitable[bool]]) -> None:
        """One client: `attempt()` (whether it got its answer) again and again until the time is up."""
        while (started := time.monotonic()) < self.measure_from + self.seconds:
            ok = await attempt()
            if started >= self.measure_from:
                if ok:
                    self.latencies.append(time.monotonic() - started)
                else:
                    self.failed += 1

    def summary(self) -> dict[str, float]:
        return {
            "goodput": len(self.latencies) / self.seconds,
            "failed": self.failed,
            "p50_ms": percentile(self.latencies, 50) * 1000,
            "p99_ms": percentile(self.latencies, 99) * 1000,
        }


async def closed_loop(base: str, clients: int, seconds: float, build: Callable[[str], Request]) -> dict[str, float]:
    """`clients` clients sending `build`'s requests for `seconds` after a 1 s warm-up: goodput, p50, p99 (ms)."""
    tally = Tally(seconds)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(base, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def attempt() -> bool:
            path, body, headers = build(prompt(next(NUMBERS)))
            try:
                async with session.post(path, data=body, headers=headers) as response:
                    await response.read()
                    return response.status == 200
            except (TimeoutError, aiohttp.ClientError):
                return False

        await asyncio.gather(*(tally.loop(attempt) for _ in range(clients)))
    return tally.summary()


def check_same_answer(base: str, target: str) -> None:
    """The four ways name the same five characters for one prompt (else the comparison means nothing)."""
    import urllib.request

    text = prompt(7)
    tops = []
    for build in WAYS.values():
        path, body, headers = build(text)
        with urllib.request.urlopen(urllib.request.Request(base + path, body, headers), timeout=30) as response:
            data, length = response.read(), response.headers.get("Inference-Header-Content-Length")
        if path.startswith("/v1"):
            tops.append([c["token"] for c in json.loads(data)["candidates"]])
            continue
        head = json.loads(data[: int(length)] if length else data)
        output = head["outputs"][0]
        if "data" in output:
            values = output["data"]
        else:
            values = decode_bytes_elements(memoryview(data)[int(length) :], 5, "next_char_probs")
        tops.append([v.split(":", 2)[2] for v in values])
    tops.append(grpc_top(target, text))
    if any(top != tops[0] for top in tops):
        raise SystemExit(f"the ways disagree: {tops}")


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# The Open Inference Protocol against /v1",
        "",
        f"`{report['command']}`, {report['when']}, on {report['machine']} ({report['cpu']}); one server, "
        f"medians of {report['rounds']} rounds of {report['seconds']:g} s per level and way, loopback.",
        "",
        "| clients | way | goodput/s | p50 ms | p99 ms | goodput / /v1's |",
        "|---|---|---|---|---|---|",
    ]
    for level, ways in report["levels"].items():
        base = ways["/v1 next-token"]["goodput"]
        for way, figures in ways.items():
            lines.append(
                f"| {level} | {way} | {figures['goodput']:.0f} | {figures['p50_ms']:.1f} | {figures['p99_ms']:.1f} "
                f"| {figures['goodput'] / base:.2f} x |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference_protocol", description=__doc__.split("\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    grpc_port = free_port()
    proc, base = start_gunicorn(ARTIFACTS, GRPC_PORT=str(grpc_port))
    target = f"127.0.0.1:{grpc_port}"
    try:
        wait_until_up(proc, base)
        check_same_answer(base, target)
        ways = [*WAYS, GRPC_WAY]
        runs: dict[int, dict[str, list[dict[str, float]]]] = {level: {way: [] for way in ways} for level in args.levels}
        for _ in range(args.rounds):
            for level in args.levels:
                for way, build in WAYS.items():
                    runs[level][way].append(asyncio.run(closed_loop(base, level, args.seconds, build)))
                runs[level][GRPC_WAY].append(asyncio.run(grpc_closed_loop(target, level, args.seconds)))
    finally:
        stop(proc)
    levels = {
        level: {
            way: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]} for way, rounds in ways.items()
        }
        for level, ways in runs.items()
    }
    report = {
        **stamp("benchmarks.inference_protocol", argv),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "levels": levels,
    }
    write_report(args.out, "inference_protocol", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
