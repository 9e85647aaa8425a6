"""Build the image, run its own command, exercise it over loopback, stop it, and clean up.

    python -m tests.container_smoke [--keep-base]

Uses `docker` where a Docker engine answers. Otherwise uses buildah (chroot isolation, vfs
storage), and where `python:3.11-slim` cannot be pulled, a stand-in base image bootstrapped
from Debian packages (see ../shared/containers.md on this project's machines). Needs root
for buildah and debootstrap. Exits non-zero on any failure; always removes its containers
and its image.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.servers import free_port

REPO = Path(__file__).resolve().parent.parent
BASE = "docker.io/library/python:3.11-slim"
IMAGE = "localhost/charlm-serve:smoke"
BUILDAH = ["buildah", "--storage-driver", "vfs"]


def log(message: str) -> None:
    print(f"[smoke {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    log("$ " + shlex.join(cmd))
    return subprocess.run(cmd, check=True, text=True, **kwargs)


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def docker_engine_answers() -> bool:
    return (
        shutil.which("docker") is not None and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    )


def wait_ready(base: str, proc: subprocess.Popen[str], limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"the container's command exited with {proc.returncode} before it was ready:\n{output}")
        try:
            if http("GET", f"{base}/readyz")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"/readyz did not answer 200 within {limit:.0f} s")


def exercise(base: str) -> None:
    """One call per inference endpoint, with checks on the answers."""
    status, body = http("POST", f"{base}/v1/next-token", {"text": "To be, or not to b", "top_k": 3})
    assert status == 200 and len(body["candidates"]) == 3, body
    status, body = http("POST", f"{base}/v1/generate", {"prompt": "KING", "max_tokens": 30, "seed": 1})
    assert status == 200 and len(body["choices"][0]["text"]) == 30, body
    status, body = http("POST", f"{base}/v1/score", {"texts": ["Shall I compare thee"], "include_tokens": True})
    result = body["results"][0]
    assert status == 200 and abs(result["logprob"] - sum(t["logprob"] for t in result["tokens"])) < 1e-9, body
    status, body = http("POST", f"{base}/v1/classify", {"texts": ["My liege, the French are landed."]})
    assert status == 200 and body["results"][0]["label"], body
    status, body = http("POST", f"{base}/v1/score", {"texts": []})
    assert status == 400 and body["error"]["param"] == "texts", body
    log("next-token, generate, score, classify and a 400 all answered as expected")


def descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child in Path("/proc").glob("[0-9]*"):
            try:
                stat = (child / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(child.name))
                frontier.append(int(child.name))
    return found


def processes(pids: list[int], word: str) -> dict[int, tuple[int, int]]:
    """{pid: (uid, parent pid)} for the processes among `pids` whose command line has `word`."""
    found = {}
    for pid in pids:
        try:
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = dict(line.split(":", 1) for line in (Path("/proc") / str(pid) / "status").read_text().splitlines())
        except OSError:
            continue
        if word in cmdline:
            found[pid] = (int(status["Uid"].split()[0]), int(status["PPid"].strip()))
    return found


# --------------------------------------------------------------------------- buildah path


def ensure_base_image() -> None:
    if subprocess.run([*BUILDAH, "inspect", "--type", "image", BASE], capture_output=True).returncode == 0:
        log(f"base image {BASE} is present")
        return
    if subprocess.run([*BUILDAH, "pull", BASE], capture_output=True).returncode == 0:
        log(f"pulled {BASE}")
        return
    log(f"{BASE} cannot be pulled; bootstrapping a stand-in from Debian packages")
    with tempfile.TemporaryDirectory(prefix="rootfs-") as rootfs:
        os.chmod(rootfs, 0o755)  # it becomes the image's "/": a private 0700 root would lock out non-root users
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python-is-python3,ca-certificates",
             "bookworm", rootfs], stdout=subprocess.DEVNULL)  # fmt: skip
        Path(rootfs, "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        run(["podman", "--storage-driver", "vfs", "import", "-", BASE], stdin=tar.stdout, stdout=subprocess.DEVNULL)
        tar.wait()


def pip_index_url() -> str:
    """The index pip uses here: its configured `index-url` (environment or config files), else pip's
    own built-in default; read at run time so that no registry is named in this repository."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    configured = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True, text=True
    )
    if configured.returncode == 0 and configured.stdout.strip():
        return configured.stdout.strip()
    from pip._internal.models.index import PyPI  # pip's default, where nothing overrides it

    return str(PyPI.simple_url)


def build_with_buildah() -> None:
    cmd = [*BUILDAH, "bud", "--isolation", "chroot", "--format", "docker", "--layers=false", "-t", IMAGE]
    find_links, cert = os.environ.get("PIP_FIND_LINKS", ""), os.environ.get("PIP_CERT", "")
    if find_links:
        # The CPU wheel of torch lies in this folder here; PyTorch's index cannot be reached, so torch
        # comes from the index pip itself uses on this machine.
        cmd += ["-v", f"{find_links}:{find_links}:ro", "--build-arg", f"PIP_FIND_LINKS={find_links}"]
        cmd += ["--build-arg", f"TORCH_INDEX_URL={pip_index_url()}"]
    if cert:
        cmd += ["-v", f"{cert}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"]
    run([*cmd, str(REPO)])


def image_config() -> dict[str, Any]:
    out = subprocess.run([*BUILDAH, "inspect", "--type", "image", IMAGE], check=True, text=True, capture_output=True)
    config: dict[str, Any] = json.loads(out.stdout)["Docker"]["config"]
    return config


def smoke_buildah(keep_base: bool) -> None:
    ensure_base_image()
    started = time.monotonic()
    build_with_buildah()
    log(f"built {IMAGE} in {time.monotonic() - started:.0f} s")
    config = image_config()
    size = subprocess.run(
        [*BUILDAH, "images", "--format", "{{.Size}}", IMAGE], check=True, text=True, capture_output=True
    ).stdout.strip()
    log(f"image size: {size}; user {config.get('User')!r}; cmd {config.get('Cmd')}")
    assert config.get("User") not in (None, "", "root", "0", "0:0"), "the image must not run as root"
    assert "8000/tcp" in (config.get("ExposedPorts") or {}), "the image must EXPOSE 8000"
    healthcheck = (config.get("Healthcheck") or {}).get("Test") or []
    assert healthcheck[:1] == ["CMD"], f"expected an exec-form HEALTHCHECK, got {healthcheck}"

    container = subprocess.run([*BUILDAH, "from", IMAGE], check=True, text=True, capture_output=True).stdout.strip()
    proc: subprocess.Popen[str] | None = None
    try:
        port = free_port()
        command = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
        # buildah run applies the image's WORKDIR, ENV and USER, and shares the host's network.
        proc = subprocess.Popen(
            [*BUILDAH, "run", "--isolation", "chroot", "--env", f"PORT={port}", container, "--", *command],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc)
        log(f"ready at {base}")
        exercise(base)

        gunicorns = processes(descendants(proc.pid), "gunicorn")
        log(f"gunicorn processes (pid: (uid, parent)): {gunicorns}")
        assert gunicorns and all(uid != 0 for uid, _ in gunicorns.values()), "gunicorn must not run as root"

        health = subprocess.run(
            [*BUILDAH, "run", "--isolation", "chroot", "--env", f"PORT={port}", container, "--", *healthcheck[1:]],
            capture_output=True, text=True,
        )  # fmt: skip
        assert health.returncode == 0, f"HEALTHCHECK failed: {health.stderr}"
        log("the image's HEALTHCHECK command passes")

        # The workers are the gunicorn processes with no gunicorn children, and their common parent
        # is the master (buildah's chroot helper above it also names gunicorn on its command line).
        parents = {parent for _, parent in gunicorns.values()}
        [master] = {parent for pid, (_, parent) in gunicorns.items() if pid not in parents}
        stop_started = time.monotonic()
        os.kill(master, signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        took = time.monotonic() - stop_started
        assert proc.returncode == 0, f"the container exited with {proc.returncode} on SIGTERM:\n{output}"
        assert "Handling signal: term" in output and "Shutting down: Master" in output, output
        log(f"SIGTERM: graceful shutdown in {took:.1f} s, exit code 0")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run([*BUILDAH, "rm", container], capture_output=True)
        subprocess.run([*BUILDAH, "rmi", "--force", IMAGE], capture_output=True)
        if not keep_base:
            subprocess.run([*BUILDAH, "rmi", "--force", BASE], capture_output=True)
        subprocess.run([*BUILDAH, "rmi", "--prune"], capture_output=True)
        log("removed the container and the image")


# --------------------------------------------------------------------------- docker path


def smoke_docker() -> None:
    run(["docker", "build", "-t", IMAGE, str(REPO)])
    port = free_port()
    name = f"charlm-smoke-{os.getpid()}"
    try:
        run(["docker", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", IMAGE], stdout=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if http("GET", f"{base}/readyz")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            assert time.monotonic() < deadline, "/readyz did not answer"
            time.sleep(0.5)
        exercise(base)
        user = subprocess.run(["docker", "exec", name, "id", "-u"], check=True, text=True, capture_output=True)
        assert user.stdout.strip() != "0", "the container must not run as root"
        run(["docker", "stop", "--time", "30", name], stdout=subprocess.DEVNULL)
        state = json.loads(
            subprocess.run(["docker", "inspect", name], check=True, text=True, capture_output=True).stdout
        )
        assert state[0]["State"]["ExitCode"] == 0, "the stop was not graceful"
        log("SIGTERM: graceful shutdown, exit code 0")
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        subprocess.run(["docker", "rmi", "-f", IMAGE], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep-base", action="store_true", help="keep the stand-in base image for the next run")
    args = parser.parse_args()
    started = time.monotonic()
    try:
        if docker_engine_answers():
            smoke_docker()
        else:
            smoke_buildah(args.keep_base)
    except (AssertionError, RuntimeError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        log(f"FAILED: {exc}")
        return 1
    log(f"container smoke test passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
