"""Start the shipped gunicorn config on a free loopback port, with its output in a file: one helper for
the benchmarks, the tests and the container smoke test (the benchmarks import nothing from tests/)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GunicornProcess(subprocess.Popen[str]):
    """A gunicorn master whose output goes to a file: an unread pipe fills up under load and then
    blocks every log write in the server, which looks like a hung master."""

    def __init__(self, args: list[str], log: IO[str], **kwargs: Any) -> None:
        super().__init__(args, stdout=log, stderr=subprocess.STDOUT, text=True, **kwargs)
        self.log = log

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()


def start_gunicorn(artifacts: Path, **env: str) -> tuple[GunicornProcess, str]:
    """The shipped gunicorn config on a free loopback port; returns the master process and base URL."""
    return start_checkout(REPO, artifacts, **env)


def start_checkout(repo: Path, artifacts: Path, **env: str) -> tuple[GunicornProcess, str]:
    """As start_gunicorn, with the code and gunicorn config of another checkout of the project."""
    port = free_port()
    environment = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "ARTIFACTS_DIR": str(artifacts),
                   "GRPC_PORT": str(free_port()), **env}  # fmt: skip
    gunicorn = Path(sys.executable).with_name("gunicorn")
    log = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - closed by stop()
    if repo != REPO:  # another checkout's code, with this environment's packages
        environment["PYTHONPATH"] = str(repo)
    proc = GunicornProcess([str(gunicorn), "-c", "gunicorn.conf.py"], log, cwd=repo, env=environment)
    return proc, f"http://127.0.0.1:{port}"


def answers(base: str, path: str) -> bool:
    """Whether GET `path` answers 200 now."""
    try:
        with urllib.request.urlopen(f"{base}{path}", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def wait_until_up(proc: GunicornProcess, base: str, path: str = "/readyz", limit: float = 90.0) -> None:
    """Until GET `path` answers 200; RuntimeError with the server's log if it exits first or takes longer."""
    deadline = time.monotonic() + limit
    while not answers(base, path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{base} did not start:\n{proc.output()}")
        time.sleep(0.2)


def stop(proc: GunicornProcess) -> str:
    """SIGTERM (a graceful stop), then SIGKILL if it takes longer than 30 s; returns everything it logged
    (nothing when it was stopped before)."""
    if proc.log.closed:
        return ""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    output = proc.output()
    proc.log.close()
    return output


def metric_total(text: str, name: str) -> float:
    """The sum of every series of a Prometheus metric (all label values) in an exposition text."""
    total = 0.0
    for line in text.splitlines():
        if line == name or line.startswith((f"{name} ", f"{name}{{")):
            total += float(line.rsplit(" ", 1)[1])
    return total
