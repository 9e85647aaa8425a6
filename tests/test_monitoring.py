"""The monitoring kit in deploy/monitoring against a real Prometheus (Debian's `prometheus` package, which
.ci/run installs) scraping a real server on loopback: promtool accepts the alerting rules, every alert
expression parses in Prometheus, and every dashboard query returns series once traffic has flowed."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from benchmarks.servers import free_port
from tests.conftest import REPO, gunicorn_server

MONITORING = REPO / "deploy/monitoring"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None, reason="Debian's prometheus is not installed")


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_alerting_rules() -> None:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "rules", str(MONITORING / "alerts.yaml")],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert {r["alert"] for r in alert_rules()} >= {"CharlmServeErrorRate", "CharlmServeP99Latency",
                                                   "CharlmServeShedding", "CharlmServeVersionRefused"}  # fmt: skip


@pytest.fixture(scope="module")
def prometheus(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A server with a small body limit and a short header timeout (so that traffic can make every kind of
    series), scraped every second by a Prometheus of its own."""
    folder = tmp_path_factory.mktemp("prometheus")
    with gunicorn_server(tiny_artifacts, WORKERS="2", HEADER_TIMEOUT_SECONDS="1", MAX_BODY_BYTES="4096") as base:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(MONITORING / "alerts.yaml")],
            "scrape_configs": [
                {"job_name": "charlm-serve", "static_configs": [{"targets": [base.removeprefix("http://")]}]}
            ],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        assert PROMETHEUS is not None
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        prom = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if requests.get(f"{prom}/-/ready", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, "prometheus did not start"
                time.sleep(0.2)
            traffic(base)
            yield base, prom
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def traffic(base: str) -> None:
    """A few seconds of every kind of request the panels show, errors and slow clients included."""
    until = time.monotonic() + 6
    with requests.Session() as session:
        while time.monotonic() < until:
            session.post(f"{base}/v1/next-token", json={"text": "ROMEO: But soft, what light"}, timeout=30)
            session.post(f"{base}/v1/generate", json={"prompt": "KING:", "max_tokens": 20}, timeout=30)
            session.post(f"{base}/v1/score", json={"texts": ["JULIET: O Romeo"]}, timeout=30)
            session.post(f"{base}/v1/next-token", json={"text": 5}, timeout=30)  # 400
            session.post(f"{base}/v1/next-token", data=b"x" * 10_000, timeout=30)  # 413 from the event loop
        with socket.create_connection((base.removeprefix("http://").split(":")[0], int(base.rsplit(":", 1)[1]))) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # never finishes its headers: closed at the deadline (408)
            time.sleep(2.0)
    time.sleep(3)  # a few more scrapes


def query(prom: str, expr: str) -> dict[str, Any]:
    answer = requests.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body: dict[str, Any] = answer.json()
    return body


def test_every_dashboard_query_returns_series(prometheus: tuple[str, str]) -> None:
    _, prom = prometheus
    empty = []
    for title, expr in dashboard_queries():
        body = query(prom, expr)
        assert body["status"] == "success", (title, expr, body)
        if not body["data"]["result"]:
            empty.append((title, expr))
    assert not empty, f"queries without series: {empty}"


def test_every_alert_expression_parses_and_is_evaluated(prometheus: tuple[str, str]) -> None:
    _, prom = prometheus
    for rule in alert_rules():
        assert query(prom, rule["expr"])["status"] == "success", rule["alert"]
    groups = requests.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(loaded) == {r["alert"] for r in alert_rules()}
    assert all(rule["health"] == "ok" for rule in loaded.values()), loaded
