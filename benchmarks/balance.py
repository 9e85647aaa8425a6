"""How a burst of keep-alive connections spreads over the gunicorn workers.

    python -m benchmarks.balance [--tries 12] [--connections 8] [--off]

Starts the shipped server (2 workers; `--off` sets BALANCE_CONNECTIONS=0, gunicorn's stock
behaviour), then, `--tries` times, opens `--connections` keep-alive connections at once from an
asyncio client, sends a next-token request on each (three rounds), and counts each worker's
established connections. Prints how often each split occurred and writes it to balance.json and .md
(balance-stock.* with `--off`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
from pathlib import Path

import aiohttp
import psutil

from benchmarks.common import RESULTS, utc_now, window, write_report
from benchmarks.loadgen import Server


async def one_burst(server: Server, connections: int) -> tuple[int, ...]:
    """The number of connections each worker holds after one burst, fewest first."""
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(server.base, connector=connector) as session:

        async def request(number: int) -> None:
            body = {"text": window(number, 100), "top_k": 5}
            async with session.post("/v1/next-token", json=body) as response:
                await response.read()

        for round_ in range(3):
            await asyncio.gather(*(request(round_ * connections + i) for i in range(connections)))
        counts = [established(worker, server.port) for worker in server.master.children()]
    return tuple(sorted(counts))


def established(worker: psutil.Process, port: int) -> int:
    return sum(1 for c in worker.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tries", type=int, default=12)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--off", action="store_true", help="gunicorn's stock accepting (BALANCE_CONNECTIONS=0)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ["WORKERS"] = "2"
    os.environ["BALANCE_CONNECTIONS"] = "0" if args.off else "1"
    server = Server(batching=True)
    try:
        server.wait_ready()  # with both workers forked
        splits = collections.Counter(asyncio.run(one_burst(server, args.connections)) for _ in range(args.tries))
    finally:
        server.stop()
    label = "stock gunicorn" if args.off else "balanced"
    report = {
        "date": utc_now(),
        "accepting": label,
        "connections": args.connections,
        "tries": args.tries,
        "splits": {" / ".join(map(str, split)): count for split, count in sorted(splits.items())},
    }
    table = (
        f"Measured {report['date']} with `python -m benchmarks.balance{' --off' if args.off else ''}` ({label}: "
        f"{args.connections} keep-alive connections at once over 2 workers, {args.tries} bursts).\n\n"
        "| connections per worker | bursts |\n|---|---|\n"
        + "".join(f"| {split} | {count} |\n" for split, count in report["splits"].items())
    )
    write_report(args.out, "balance-stock" if args.off else "balance", report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
