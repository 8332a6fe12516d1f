"""The Grafana dashboard of docker/ against what hotlora really exports, and a real Prometheus.

(a) every metric name in the dashboard's PromQL is a sample name in /metrics after some traffic;
(b) a real Prometheus (/usr/bin/prometheus, Debian's package) scrapes a live hotlora and answers
    queries, and every dashboard expression evaluates there (skipped without the binary).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from hotlora.adapters.demo_tasks import DEMO_ADAPTERS, prompt_for
from hotlora.server.config import Settings
from hotlora.server.main import create_app

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "hotlora.json"
PROVISIONING = ROOT / "docker" / "grafana" / "provisioning"
PROMETHEUS = Path("/usr/bin/prometheus")
# Digits too: hotlora_e2e_request_latency_seconds.
METRIC = re.compile(r"\bhotlora_[a-zA-Z0-9_:]+")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
SELECTOR = re.compile(r"\b(hotlora_[a-zA-Z0-9_:]+)\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
# Grafana's interval variables, for evaluating the expressions in Prometheus itself.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def dashboard() -> dict[str, Any]:
    d: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return d


def exprs() -> list[str]:
    return [t["expr"] for p in _panels(dashboard()["panels"]) for t in p.get("targets", [])]


def _upload(post: Any, name: str, src: Path, key: str | None = None) -> Any:
    files = {
        "config": ("adapter_config.json", (src / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (src / "adapter_model.safetensors").read_bytes()),
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return post("/v1/adapters", data={"name": name}, files=files, headers=headers)


def _complete(post: Any, model: str, word: str = "hotlora", stream: bool = False) -> Any:
    body = {
        "model": model,
        "prompt": prompt_for(word),
        "max_tokens": 16,
        "temperature": 0,
        "stream": stream,
    }
    return post("/v1/completions", json=body)


def test_dashboard_is_well_formed() -> None:
    d = dashboard()
    assert d["uid"] == "hotlora" and d["title"] == "hotlora"
    panels = list(_panels(d["panels"]))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    yaml = pytest.importorskip("yaml")
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    uids = {s["uid"] for s in sources["datasources"] if s["type"] == "prometheus"}
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in [p, *p["targets"]]:
            assert t["datasource"] == {"type": "prometheus", "uid": next(iter(uids))}, p["title"]
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "hotlora.yaml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_every_dashboard_metric_is_exported(tmp_path: Path) -> None:
    # One device slot, so that a second adapter evicts the first (hotlora_adapter_evictions_total).
    settings = Settings(adapter_store=tmp_path, max_adapters=1)
    with TestClient(create_app(settings)) as client:
        r = _complete(client.post, "reverse")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == " aroltoh"
        r = _complete(client.post, "upper", "serving", stream=True)
        assert r.status_code == 200, r.text
        r = _upload(client.post, "reverse", DEMO_ADAPTERS / "reverse")  # a new version: hot swap
        assert r.status_code == 201 and r.json()["version"] == 2, r.text
        assert _complete(client.post, "reverse").status_code == 200
        text = client.get("/metrics").text

    samples: dict[str, set[str]] = {}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, set()).update(s.labels)
            values[s.name] = values.get(s.name, 0.0) + s.value
    assert values["hotlora_adapter_hot_swaps_total"] == 1
    assert values["hotlora_adapter_evictions_total"] >= 1
    used = {m for e in exprs() for m in METRIC.findall(e)}
    assert len(used) >= 20, sorted(used)
    missing = sorted(used - set(samples))
    assert not missing, f"dashboard metrics not in /metrics: {missing}"
    # Label names in selectors and `by (...)` exist on the metrics they are used with.
    for e in exprs():
        for metric, body in SELECTOR.findall(e):
            for label in MATCHER.findall(body):
                assert label in samples[metric], f"{metric} has no label {label!r}: {e}"
        labels = set().union(*(samples[m] for m in METRIC.findall(e)))
        for group in BY.findall(e):
            for label in (g.strip() for g in group.split(",")):
                assert label in labels, f"no label {label!r} in {e}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live_url(tmp_path: Path) -> Iterator[str]:
    settings = Settings(adapter_store=tmp_path / "store", port=_free_port())
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=settings.port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("hotlora did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.skipif(
    not PROMETHEUS.exists(),
    reason="needs a Prometheus server at /usr/bin/prometheus "
    "(apt-get install prometheus; CI installs it with docker/install_ci_deps.sh)",
)
def test_prometheus_scrapes_hotlora(live_url: str, tmp_path: Path) -> None:
    with httpx.Client(base_url=live_url, timeout=60) as hl:
        r = _complete(hl.post, "reverse")
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == " aroltoh", r.text
    target = live_url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: hotlora\n    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    prom_port = _free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{prom_port}", timeout=10) as prom:

            def query(q: str) -> dict[str, Any]:
                r = prom.get("/api/v1/query", params={"query": q})
                assert r.status_code == 200, f"{q}: {r.text}"
                body: dict[str, Any] = r.json()
                assert body["status"] == "success", f"{q}: {body}"
                return body

            result: list[dict[str, Any]] = []
            deadline = time.monotonic() + 30
            while not result:
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
                assert time.monotonic() < deadline, (
                    "Prometheus got no hotlora_requests_total in 30 s"
                )
                time.sleep(0.5)
                try:
                    result = query("hotlora_requests_total")["data"]["result"]
                except httpx.TransportError:
                    continue  # not listening yet
            stop = [s for s in result if s["metric"].get("outcome") == "stop"]
            assert stop and float(stop[0]["value"][1]) == 1.0, result
            assert stop[0]["metric"]["job"] == "hotlora"
            up = query('up{job="hotlora"}')["data"]["result"]
            assert up and up[0]["value"][1] == "1", up
            # Every dashboard query is valid PromQL that Prometheus evaluates.
            for e in exprs():
                for var, value in GRAFANA_VARS.items():
                    e = e.replace(var, value)
                query(e)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
