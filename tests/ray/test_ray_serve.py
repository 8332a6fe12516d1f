"""hotlora on Ray Serve (server/ray_app.py): a local 2-CPU Ray cluster, 2 replicas of the demo
model behind the ingress, compared with the single-process server.

Skipped without `ray[serve]` (pip install 'hotlora[ray]').
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'hotlora[ray]'")

import ray  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from ray import serve  # noqa: E402

from hotlora.server.ray_app import REPLICA_HEADER, application  # noqa: E402
from hotlora.server.ray_metrics import merge_texts  # noqa: E402
from tests.server.support import (  # noqa: E402
    DEMO,
    DEMO_NAMES,
    PROMPT,
    SORT_PROMPT,
    demo_files,
    free_port,
    make_settings,
    upload,
)
from tests.server.support import (
    serve as serve_single,
)

ADMIN, KEY = "admin-key", "user-key"
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
USER_H = {"Authorization": f"Bearer {KEY}"}
APP = "hotlora"
TIMEOUT = 60.0


def _settings(root: Path, **more: Any) -> Any:
    return make_settings(
        root,
        admin_key=ADMIN,
        api_keys=[KEY],
        engine_process=False,  # the engine on a thread of each replica: fewer processes here
        engine_threads=1,
        access_log=False,
        **more,
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with serve_single(_settings(tmp_path_factory.mktemp("single"))) as client:
        yield client


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    settings = _settings(tmp_path_factory.mktemp("ray"), replicas=2, replica_num_cpus=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(settings), name=APP, route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def _body(model: str, prompt: str = PROMPT, **more: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "temperature": 0, "max_tokens": 24, **more}


def _prompt(name: str) -> str:
    return SORT_PROMPT if name == "sort" else PROMPT


def _direct(body: dict[str, Any], path: str = "/v1/completions") -> tuple[str, int, bytes]:
    """One request straight to some replica (no affinity): (replica, status, body)."""
    handle = serve.get_deployment_handle("HotloraReplica", app_name=APP).options(stream=True)
    headers = [("content-type", "application/json"), ("authorization", USER_H["Authorization"])]
    gen: Any = handle.handle.remote("POST", path, b"", headers, json.dumps(body).encode())
    head = next(gen)
    return head["replica"], head["status"], b"".join(gen)


def _on_every_replica(body: dict[str, Any], n: int = 2) -> dict[str, tuple[int, bytes, float]]:
    """Send `body` straight to replicas, two at a time, until each of `n` answered once:
    replica -> (status, body, seconds from the first send to its answer)."""
    start = time.monotonic()
    seen: dict[str, tuple[int, bytes, float]] = {}
    with ThreadPoolExecutor(2) as pool:
        while len(seen) < n and time.monotonic() - start < 30:
            for replica, status, text in pool.map(lambda _: _direct(body), range(2)):
                seen.setdefault(replica, (status, text, time.monotonic() - start))
    assert len(seen) == n, seen
    return seen


def test_completions_equal_the_single_server(cluster: httpx.Client, single: TestClient) -> None:
    for name in (DEMO, *DEMO_NAMES):
        body = _body(name, _prompt(name))
        want = single.post("/v1/completions", json=body, headers=USER_H).json()
        r = cluster.post("/v1/completions", json=body, headers=USER_H)
        assert r.status_code == 200, r.text
        assert r.headers[REPLICA_HEADER]
        assert r.json()["choices"] == want["choices"], name
        assert r.json()["usage"] == want["usage"], name
        stream = {**body, "stream": True}
        got = cluster.post("/v1/completions", json=stream, headers=USER_H)
        ref = single.post("/v1/completions", json=stream, headers=USER_H)
        assert got.headers["content-type"].startswith("text/event-stream")
        assert _sse_texts(got.text) == _sse_texts(ref.text), name
    chat = {"model": "reverse", "messages": [{"role": "user", "content": "hello"}],
            "temperature": 0, "max_tokens": 16, "stream": True}  # fmt: skip
    got = cluster.post("/v1/chat/completions", json=chat, headers=USER_H)
    ref = single.post("/v1/chat/completions", json=chat, headers=USER_H)
    assert _sse_texts(got.text) == _sse_texts(ref.text)


def _sse_texts(text: str) -> tuple[str, list[str | None], bool]:
    """What a stream said: its text, finish reasons and [DONE] (ids and timestamps differ
    between servers, and how tokens are grouped into events depends on timing)."""
    pieces, reasons = [], []
    for line in text.split("\n"):
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:])["choices"]:
                pieces.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
                if choice.get("finish_reason"):
                    reasons.append(choice["finish_reason"])
    return "".join(pieces), reasons, text.rstrip().endswith("data: [DONE]")


def test_adapter_affinity(cluster: httpx.Client) -> None:
    # Fresh adapters (the tests before may have sent the demo ones to both replicas while the
    # router did not know yet where they were: then both keep them). Warm-up: one request per
    # adapter, slowly enough that the router learns each placement (replicas report their
    # adapters every 0.1 s) before the next adapter picks a replica.
    names = [f"aff-{i}" for i in range(4)]
    for name in names:
        r = upload(cluster, name, *demo_files("upper"), headers=ADMIN_H)  # type: ignore[arg-type]
        assert r.status_code == 201, r.text
    for name in names:
        assert cluster.post("/v1/completions", json=_body(name), headers=USER_H).is_success
        time.sleep(1.0)
    served: dict[str, set[str]] = {name: set() for name in names}
    for _ in range(4):
        for name in names:
            r = cluster.post("/v1/completions", json=_body(name), headers=USER_H)
            assert r.status_code == 200, r.text
            served[name].add(r.headers[REPLICA_HEADER])
    assert all(len(s) == 1 for s in served.values()), served
    assert len(set().union(*served.values())) == 2, served


def test_hot_swap_reaches_every_replica(cluster: httpx.Client) -> None:
    r = upload(cluster, "swap", *demo_files("reverse"), headers=ADMIN_H)  # type: ignore[arg-type]
    assert r.status_code == 201, r.text
    v1 = _on_every_replica(_body("swap"))
    assert all(s == 200 and json.loads(b)["choices"][0]["text"] == " olleh"
               for s, b, _ in v1.values()), v1  # fmt: skip
    r = upload(cluster, "swap", *demo_files("upper"), headers=ADMIN_H)  # type: ignore[arg-type]
    assert r.status_code == 201 and r.json()["version"] == 2, r.text
    v2 = _on_every_replica(_body("swap"))
    for status, body, seconds in v2.values():
        assert status == 200 and json.loads(body)["choices"][0]["text"] == " HELLO", body
        assert seconds <= 1.0, v2
    print("hot swap: 201 -> first v2 output per replica:",
          {k: round(s, 3) for k, (_, _, s) in v2.items()})  # fmt: skip
    assert cluster.delete("/v1/adapters/swap", headers=ADMIN_H).status_code == 200
    gone = _on_every_replica(_body("swap"))
    assert all(status == 404 for status, _, _ in gone.values()), gone
    r = cluster.post("/v1/completions", json=_body("swap"), headers=USER_H)
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_auth_and_bad_input_as_the_single_server(cluster: httpx.Client, single: TestClient) -> None:
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/completions", {"json": _body("reverse")}),  # no key: 401
        (
            "POST",
            "/v1/completions",
            {"json": _body("reverse"), "headers": ADMIN_H | {"Authorization": "Bearer wrong"}},
        ),  # fmt: skip
        ("POST", "/v1/completions", {"json": _body("nope"), "headers": USER_H}),
        ("POST", "/v1/completions", {"json": _body("reverse", temperature=-1), "headers": USER_H}),
        (
            "POST",
            "/v1/completions",
            {"content": b"{not json", "headers": USER_H | {"content-type": "application/json"}},
        ),  # fmt: skip
        ("DELETE", "/v1/adapters/reverse", {"headers": USER_H}),
        ("GET", "/v1/adapters/nope", {"headers": ADMIN_H}),
        ("GET", "/v1/nothing-here", {"headers": USER_H}),
    ]
    for method, path, kw in cases:
        want = single.request(method, path, **kw)
        got = cluster.request(method, path, **kw)
        assert got.status_code == want.status_code, (path, got.text, want.text)
        assert got.json() == want.json(), path
    assert cluster.get("/v1/models", headers=USER_H).json()["data"][0]["id"] == DEMO


def test_metrics_per_replica(cluster: httpx.Client) -> None:
    deadline = time.monotonic() + 10
    while True:
        text = cluster.get("/metrics").text
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        replicas = {s.labels.get("replica") for s in samples}
        if len(replicas) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(replicas) == 2 and None not in replicas, replicas
    names = {s.name for s in samples}
    for name in ("hotlora_kv_cache_usage_perc", "hotlora_num_requests_waiting",
                 "hotlora_lora_requests_info", "hotlora_requests_total"):  # fmt: skip
        assert name in names, name
    one = sorted(r for r in replicas if r)[0]
    r = cluster.get(f"/metrics/replica/{one}")
    assert r.status_code == 200 and "hotlora_kv_cache_usage_perc" in r.text
    assert cluster.get("/metrics/replica/nope").status_code == 404


def test_a_killed_replica_fails_fast_and_comes_back(cluster: httpx.Client) -> None:
    """Kill a replica while it generates: its streams end at once with a 503 error event, its
    plain requests answer 200 or 503 in time, the other replica's finish, and it comes back.

    The victim is the replica serving the first stream, killed once all streams have their
    first token: a fixed sleep does not know that (100 tokens took ~0.5 s on a fast VM), and
    Ray Serve may route a model's requests to either replica."""
    long: dict[str, Any] = {"max_tokens": 100, "ignore_eos": True}
    names = ["upper", *[n for n in DEMO_NAMES if n != "upper"]]
    started = [threading.Event() for _ in range(6)]
    replica_of: list[str | None] = [None] * 6

    def stream(i: int) -> tuple[str, float]:
        """The stream's last data line, and its seconds."""
        t, last = time.monotonic(), ""
        body = _body(names[i % len(names)], stream=True, **long)
        try:
            with httpx.stream("POST", f"{cluster.base_url}/v1/completions", json=body,
                              headers=USER_H, timeout=TIMEOUT) as r:  # fmt: skip
                replica_of[i] = r.headers.get(REPLICA_HEADER)
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        started[i].set()
                        last = line
        finally:
            started[i].set()  # never leave the killer waiting on a failed stream
        return last, time.monotonic() - t

    def call() -> tuple[int, float]:
        t = time.monotonic()
        try:
            r = httpx.post(f"{cluster.base_url}/v1/completions", json=_body("upper", **long),
                           headers=USER_H, timeout=TIMEOUT)  # fmt: skip
            status = r.status_code
        except httpx.HTTPError:
            status = -1
        return status, time.monotonic() - t

    replicas = [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if "HotloraReplica" in a["name"]
    ]  # fmt: skip
    with ThreadPoolExecutor(8) as pool:
        plain = [pool.submit(call) for _ in range(2)]
        streams = [pool.submit(stream, i) for i in range(6)]
        assert all(e.wait(TIMEOUT) for e in started)
        victim = replica_of[0]
        assert victim is not None
        actor = next(name for name in replicas if victim in name)
        ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)
        stream_results = [f.result() for f in streams]
        plain_results = [f.result() for f in plain]
    for replica, (last, seconds) in zip(replica_of, stream_results, strict=True):
        assert seconds < TIMEOUT
        if replica == victim:  # cut mid-generation: an error event ends it, never [DONE]
            assert "service_unavailable" in last, last
        else:
            assert last == "data: [DONE]", last
    assert all(status in (200, 503) for status, _ in plain_results), plain_results
    assert all(seconds < TIMEOUT for _, seconds in plain_results), plain_results
    deadline = time.monotonic() + 120  # Ray Serve starts a new replica
    while True:
        status = serve.status().applications[APP].deployments["HotloraReplica"]
        with contextlib.suppress(ray.exceptions.RayError, AssertionError):
            if status.status == "HEALTHY" and len(_on_every_replica(_body(DEMO))) == 2:
                break
        assert time.monotonic() < deadline, status
        time.sleep(1.0)
    r = cluster.post("/v1/completions", json=_body("upper"), headers=USER_H)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " HELLO"


def test_merge_texts_labels_every_sample() -> None:
    a = (
        "# HELP x_total things\n# TYPE x_total counter\nx_total 2.0\n"
        '# HELP g a gauge\n# TYPE g gauge\ng{k="v"} 1.0\n'
    )
    merged = merge_texts({"r1": a, "r2": a.replace("2.0", "3.0")})
    fams = {f.name: f for f in text_string_to_metric_families(merged)}
    assert [(s.labels, s.value) for s in fams["x"].samples] == [
        ({"replica": "r1"}, 2.0),
        ({"replica": "r2"}, 3.0),
    ]
    assert [s.labels for s in fams["g"].samples] == [
        {"replica": "r1", "k": "v"},
        {"replica": "r2", "k": "v"},
    ]
    assert merged.count("# TYPE g gauge") == 1
