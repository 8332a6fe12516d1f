"""Tenant quotas and rate limits over HTTP (hit exactly at their bounds), the tenants file's
reload, and the per-request deadline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.server.support import (
    DEMO,
    EXPECTED,
    PROMPT,
    LiveServer,
    assert_error,
    complete,
    demo_files,
    free_port,
    make_settings,
    serve,
    slow_steps,
    store_tree,
    upload,
)
from tests.server.tenant_support import KEYS, as_, tenant_server, tenants_doc, write_tenants

SIZE = len(demo_files("upper")[1])


def test_adapter_quotas(tmp_path: Path) -> None:
    limits = {"acme": {"max_adapters": 2}, "bob": {"max_storage_bytes": 2 * SIZE - 1}}
    with tenant_server(tmp_path, limits) as c:
        root = c.app.state.hotlora.store.root  # type: ignore[attr-defined]
        for name in ("x", "y"):
            assert upload(c, name, *demo_files("upper"), headers=as_("acme")).status_code == 201
        before = store_tree(root)
        r = upload(c, "z", *demo_files("upper"), headers=as_("acme"))
        assert_error(r, 403, param="max_adapters", contains="max_adapters")
        assert store_tree(root) == before
        # A new version of an existing adapter is not a new adapter.
        assert upload(c, "x", *demo_files("reverse"), headers=as_("acme")).status_code == 201
        assert upload(c, "a", *demo_files("upper"), headers=as_("bob")).status_code == 201
        before = store_tree(root)
        r = upload(c, "b", *demo_files("upper"), headers=as_("bob"))
        assert_error(r, 413, param="max_storage_bytes", contains="max_storage_bytes")
        assert store_tree(root) == before
        # The limit is over every stored version: deleting frees it.
        assert c.delete("/v1/adapters/a", headers=as_("bob")).status_code == 200
        assert upload(c, "b", *demo_files("upper"), headers=as_("bob")).status_code == 201
        # The admin is bound by no tenant's quota.
        r = upload(c, "acme/z", *demo_files("upper"), headers=as_("ops"))
        assert r.status_code == 201 and r.json()["name"] == "acme/z"


def _prompt_tokens(c: Any, who: str) -> int:
    r = c.post("/tokenize", json={"prompt": PROMPT}, headers=as_(who))
    return int(r.json()["count"])


def test_request_and_token_limits_hit_exactly_at_their_bounds(tmp_path: Path) -> None:
    with serve(make_settings(tmp_path)) as plain:  # the prompt's size, for the token budget
        n_prompt = int(plain.post("/tokenize", json={"prompt": PROMPT}).json()["count"])
    budget = 2 * (n_prompt + 8)
    limits = {"acme": {"requests_per_minute": 3}, "bob": {"tokens_per_minute": budget}}
    with tenant_server(tmp_path, limits) as c:
        for i in range(3):
            r = complete(c, DEMO, headers=as_("acme"), max_tokens=4)
            assert r.status_code == 200, r.text
            assert r.headers["x-ratelimit-limit-requests"] == "3"
            assert r.headers["x-ratelimit-remaining-requests"] == str(2 - i)
        r = complete(c, DEMO, headers=as_("acme"), max_tokens=4)
        assert_error(r, 429, contains="requests_per_minute")
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert complete(c, DEMO, headers=as_("ops")).status_code == 200  # others: unaffected

        # Tokens: each request reserves prompt + max_tokens and, with ignore_eos, uses it all.
        for _ in range(2):
            r = complete(c, DEMO, headers=as_("bob"), max_tokens=8, ignore_eos=True)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["total_tokens"] == n_prompt + 8
        assert r.headers["x-ratelimit-remaining-tokens"] == "0"
        r = complete(c, DEMO, headers=as_("bob"), max_tokens=1)
        assert_error(r, 429, contains="tokens_per_minute")
        assert "x-ratelimit-limit-tokens" in r.headers and "retry-after" in r.headers
        # A request that could never fit in a minute is a 400 naming what to lower.
        r = complete(c, DEMO, headers=as_("bob"), max_tokens=budget)
        assert_error(r, 400, param="max_tokens", contains="tokens_per_minute")


def test_unused_tokens_are_given_back(tmp_path: Path) -> None:
    limits = {"acme": {"tokens_per_minute": 150}}
    with tenant_server(tmp_path, limits) as c:
        n_prompt = _prompt_tokens(c, "acme")
        # " olleh" and EOS: far fewer than the 100 reserved.
        r = complete(c, "reverse", headers=as_("acme"), max_tokens=100)
        assert r.json()["choices"][0]["text"] == EXPECTED["reverse"]
        used = r.json()["usage"]["total_tokens"]
        assert used + n_prompt + 100 <= 150 < 2 * (n_prompt + 100)  # passes only if given back
        r = complete(c, "reverse", headers=as_("acme"), max_tokens=100)
        assert r.status_code == 200, r.text


def test_max_concurrent_counts_streams_until_they_end(tmp_path: Path) -> None:
    path = write_tenants(tmp_path / "t.yaml", tenants_doc({"acme": {"max_concurrent": 1}}))
    settings = make_settings(tmp_path, tenants_file=path, port=free_port(), engine_process=False)
    with LiveServer(settings) as srv:
        slow_steps(srv, 0.02)
        body = {"model": DEMO, "prompt": PROMPT, "max_tokens": 60, "ignore_eos": True,
                "stream": True}
        with httpx.Client(base_url=srv.url, headers=as_("acme"), timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as first:
                assert first.status_code == 200
                it = first.iter_lines()  # kept: a dropped iterator closes the stream
                next(it)  # it is running
                r = http.post("/v1/completions", json={**body, "stream": False})
                assert_error(r, 429, contains="max_concurrent")
                lines = list(it)
            assert lines[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in lines
            r = http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
            assert r.status_code == 200, r.text


def test_tenants_file_reloads_on_change_and_keeps_the_old_one_when_invalid(
    tmp_path: Path,
) -> None:
    path = write_tenants(tmp_path / "tenants.json", tenants_doc())
    with serve(make_settings(tmp_path, tenants_file=path)) as c:
        new_key = "sk-dave-0001"
        assert_error(c.get("/v1/models", headers={"Authorization": f"Bearer {new_key}"}), 403)
        write_tenants(path, tenants_doc(keys={**KEYS, "dave": new_key}))
        _until(lambda: c.get("/v1/models", headers={"Authorization": f"Bearer {new_key}"})
               .status_code == 200)
        path.write_text("{not json")  # a broken edit: the tenants in force stay
        time.sleep(2.5)
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {new_key}"}).status_code \
            == 200
        write_tenants(path, tenants_doc())  # dave removed: his key stops working
        _until(lambda: c.get("/v1/models", headers={"Authorization": f"Bearer {new_key}"})
               .status_code == 403)
        assert c.get("/v1/models", headers=as_("acme")).status_code == 200


def _until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_sighup_reloads_the_tenants_file(tmp_path: Path) -> None:
    """The new file has the same size and mtime as the old, so only SIGHUP can reload it."""
    path = write_tenants(tmp_path / "tenants.json", tenants_doc())
    text = path.read_text()
    old, new = KEYS["acme"], KEYS["acme"][:-1] + ("0" if KEYS["acme"][-1] != "0" else "1")
    stat = path.stat()
    port = free_port()
    env = {**os.environ, "HOTLORA_TENANTS_FILE": str(path), "HOTLORA_ENGINE_PROCESS": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hotlora.server", "serve", "--port", str(port),
         "--adapter-store", str(tmp_path / "store")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _until(lambda: _get(url, "/ready") == 200, timeout=60)
        assert _get(url, "/v1/models", old) == 200
        from hotlora.server.tenants import key_digest

        path.write_text(text.replace(key_digest(old), key_digest(new)))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        time.sleep(2.0)
        assert _get(url, "/v1/models", new) == 403  # unchanged stamp: not reloaded by polling
        proc.send_signal(signal.SIGHUP)
        _until(lambda: _get(url, "/v1/models", new) == 200)
        assert _get(url, "/v1/models", old) == 403
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _get(url: str, path: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        return httpx.get(url + path, headers=headers, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def test_request_timeout(tmp_path: Path) -> None:
    """Past the deadline a running request ends with what it has (finish_reason "length"); one
    that never started gets a 504; both rows are freed."""
    settings = make_settings(
        tmp_path, port=free_port(), engine_process=False, request_timeout_s=1.0, max_running=1
    )
    with LiveServer(settings) as srv:
        engine = srv.engine
        # 0.3 s a step: the queued request cannot start before the first's row is freed (at
        # its deadline, 1 s, then the step in flight ends), past its own deadline
        slow_steps(srv, 0.3)
        body = {"model": DEMO, "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True}
        out: dict[str, Any] = {}

        def run(key: str, extra: dict[str, Any]) -> None:
            out[key] = httpx.post(f"{srv.url}/v1/completions", json={**body, **extra}, timeout=30)

        first = threading.Thread(target=run, args=("running", {}))
        first.start()
        time.sleep(0.1)
        run("queued", {})  # max_running=1: it waits behind the first, past its deadline
        first.join()
        run("streamed", {"stream": True})
        r = out["running"]
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert 0 < r.json()["usage"]["completion_tokens"] < 100
        assert_error(out["queued"], 504, contains="request timeout")
        events = [json.loads(x[6:]) for x in out["streamed"].text.splitlines()
                  if x.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert out["streamed"].text.rstrip().endswith("data: [DONE]")
        _until(lambda: engine.num_running == 0 and not engine.has_unfinished())


def test_no_tenant_holds_more_than_half_of_the_queue(tmp_path: Path) -> None:
    path = write_tenants(tmp_path / "t.yaml", tenants_doc())
    settings = make_settings(
        tmp_path, tenants_file=path, port=free_port(), engine_process=False, max_queue=4,
        max_running=1,
    )
    with LiveServer(settings) as srv:
        slow_steps(srv, 0.05)
        body = {"model": DEMO, "prompt": PROMPT, "max_tokens": 40, "ignore_eos": True}
        statuses: dict[str, int] = {}

        def run(who: str, key: str) -> None:
            r = httpx.post(f"{srv.url}/v1/completions", json=body, headers=as_(who), timeout=60)
            statuses[key] = r.status_code

        threads = [threading.Thread(target=run, args=("acme", f"acme{i}")) for i in range(5)]
        for t in threads:
            t.start()
            time.sleep(0.1)  # in order: one runs, two wait (half of 4), the rest are refused
        run("bob", "bob")  # the other half of the queue is still there for bob
        for t in threads:
            t.join()
        assert sorted(statuses[f"acme{i}"] for i in range(5)) == [200, 200, 200, 429, 429]
        assert statuses["bob"] == 200
