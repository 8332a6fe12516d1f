"""Bounded graceful shutdown of a real `hotlora serve` process: on SIGTERM /ready says 503 at
once, new generations get 503s, running streams finish, then the process exits 0 and the
engine process is gone; past HOTLORA_SHUTDOWN_TIMEOUT_S the streams are cut and it still
exits 0. Plus the drain's answers checked in-process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from hotlora.server.lifecycle import Lifecycle, lifecycle_of
from hotlora.server.openai_schemas import MAX_N
from tests.server.support import (
    DEMO,
    assert_error,
    bearer,
    complete,
    free_port,
    make_settings,
    metric,
    serve,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")

REPO = Path(__file__).parents[2]
ADMIN_KEY, API_KEY = "adm-Rt6Wq1Zp8Kc3", "usr-Hn4Jd7Xs2Lb9"
MARKER = "qzvkjx"  # the prompt's word (the base model copies it): never in the server's log
MAX_TOKENS = 100  # the demo model's context is 128 tokens: long requests come from many choices


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path  # the process' stderr

    def lines(self) -> list[dict[str, Any]]:
        """The JSON lines of its stderr (the access log)."""
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


@contextmanager
def hotlora_serve(tmp_path: Path, **env: str) -> Iterator[Served]:
    """`hotlora serve` on a free port with a fresh store, until /ready says 200."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HOTLORA_")}
    environ = {**clean, "HOTLORA_ADMIN_KEY": ADMIN_KEY, "HOTLORA_API_KEYS": API_KEY, **env}
    log = tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "hotlora.server", "serve", "--port", str(port),
           "--adapter-store", str(tmp_path / "store")]  # fmt: skip
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=subprocess.DEVNULL, stderr=err)
    served = Served(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 180
        while not _ready(served):
            assert proc.poll() is None, f"hotlora serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "hotlora serve did not get ready"
            time.sleep(0.2)
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ready(served: Served) -> bool:
    try:
        return httpx.get(f"{served.url}/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


class Stream(threading.Thread):
    """One streamed completion read on a thread: its events with their arrival times."""

    def __init__(self, url: str, n: int) -> None:
        super().__init__(daemon=True)
        self.url, self.n = url, n
        self.events: list[tuple[float, str]] = []
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        body = {"model": DEMO, "prompt": f"in: {MARKER}\nout:", "max_tokens": MAX_TOKENS,
                "n": self.n, "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body,
                              headers=bearer(API_KEY), timeout=120) as r:  # fmt: skip
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append((time.monotonic(), line.removeprefix("data: ")))
        except Exception as e:  # noqa: BLE001 - a cut stream: the test looks at it
            self.error = e

    def usage(self) -> dict[str, Any]:
        assert self.error is None, self.error
        assert self.events and self.events[-1][1] == "[DONE]", self.events[-3:]
        usage: dict[str, Any] = json.loads(self.events[-2][1])["usage"]
        return usage


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _samples(http: httpx.Client) -> list[Sample]:
    r = http.get("/metrics")
    assert r.status_code == 200, r.text
    return [x for fam in text_string_to_metric_families(r.text) for x in fam.samples]


def _wait(done: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigterm_drains_running_streams_then_exits_0(tmp_path: Path) -> None:
    # Choices per stream; with 2 rows decoded at a time each stream runs 2,400 steps, so the
    # first still streams after the checks below on a fast VM (~0.3 ms a step there).
    n = 48
    with hotlora_serve(tmp_path, HOTLORA_SHUTDOWN_TIMEOUT_S="120", HOTLORA_MAX_RUNNING="2") as s:
        engine = _children(s.proc.pid)
        assert engine, "no engine process"
        first = Stream(s.url, n)
        _wait(lambda: first.events, "the first stream's first event")
        second = Stream(s.url, n)  # queued behind the first: its response starts later
        with httpx.Client(base_url=s.url, headers=bearer(API_KEY), timeout=10) as http:

            def waiting() -> float:
                return metric(_samples(http), "hotlora_num_requests_waiting")

            _wait(lambda: waiting() >= n, "the second stream to be queued")
            s.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            ready = http.get("/ready")
            assert time.monotonic() - sent < 2.0
            assert_error(ready, 503, contains="shutting down")
            for path, body in (
                ("/v1/completions", {"model": DEMO, "prompt": "x", "max_tokens": 1}),
                ("/v1/chat/completions",
                 {"model": DEMO, "messages": [{"role": "user", "content": "x"}]}),
            ):  # fmt: skip
                r = http.post(path, json=body)
                assert_error(r, 503, contains="shutting down")
                assert r.headers["retry-after"] == "1"
            assert http.get("/health").status_code == 200  # still serving the rest
            assert http.get("/v1/models").status_code == 200
            checked = time.monotonic()
        for stream in (first, second):
            stream.join(timeout=120)
            usage = stream.usage()  # finished with its usage and [DONE]
            assert usage["completion_tokens"] == n * MAX_TOKENS
        # both kept streaming after SIGTERM and the checks above
        assert any(t > checked and '"text"' in e for t, e in first.events)
        assert second.events[0][0] > sent
        rc = s.proc.wait(timeout=60)
        exited = time.monotonic() - sent
    assert rc == 0, s.log.read_text()[-3000:]
    assert exited < 60, exited  # it left when drained, not at the 120 s timeout
    _wait(lambda: all(_gone(pid) for pid in engine), "the engine process to stop", 15)
    log = s.log.read_text()
    lines = s.lines()
    done = [x for x in lines if x.get("path") == "/v1/completions" and x["status"] == 200]
    assert len(done) == 2 and all(x["completed"] for x in done), done
    assert all(x["completion_tokens"] == n * MAX_TOKENS for x in done), done
    assert any(x.get("path") == "/ready" and x["status"] == 503 for x in lines)
    assert "HTTP/1.1" not in log, "uvicorn's access log is on too"
    for secret in (ADMIN_KEY, API_KEY, MARKER):
        assert secret not in log, f"{secret!r} was logged"


def test_past_the_shutdown_timeout_a_stream_is_cut_and_the_process_exits_0(
    tmp_path: Path,
) -> None:
    timeout = 1.0
    # 128 choices (the most a request may ask) of 100 tokens, one decoded at a time: far longer
    # than the timeout (32 choices once finished inside it on a fast, quiet VM: ~0.3 ms a token)
    with hotlora_serve(
        tmp_path, HOTLORA_SHUTDOWN_TIMEOUT_S=str(timeout), HOTLORA_MAX_RUNNING="1"
    ) as s:
        engine = _children(s.proc.pid)
        stream = Stream(s.url, MAX_N)
        _wait(lambda: stream.events, "the stream's first event")
        s.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        rc = s.proc.wait(timeout=60)
        exited = time.monotonic() - sent
        stream.join(timeout=30)
    assert rc == 0, s.log.read_text()[-3000:]
    assert timeout <= exited < timeout + 20, exited  # it waited, then no longer than that
    assert "[DONE]" not in [e for _, e in stream.events]  # cut
    _wait(lambda: all(_gone(pid) for pid in engine), "the engine process to stop", 15)
    cut = [x for x in s.lines() if x.get("path") == "/v1/completions"]
    assert len(cut) == 1 and cut[0]["completed"] is False, cut
    assert 0 < cut[0]["completion_tokens"] < 32 * MAX_TOKENS


def test_a_draining_app_refuses_generations_and_is_not_ready(tmp_path: Path) -> None:
    with serve(make_settings(tmp_path, engine_process=False)) as client:
        assert client.get("/ready").status_code == 200
        lifecycle_of(client.app).begin_drain()
        r = client.get("/ready")
        assert_error(r, 503, contains="shutting down")
        assert r.headers["retry-after"] == "1" and "x-request-id" in r.headers
        refused = complete(client, DEMO)
        assert_error(refused, 503, contains="shutting down")
        assert refused.headers["retry-after"] == "1"
        assert client.get("/health").status_code == 200
        assert client.post("/tokenize", json={"prompt": "hi"}).status_code == 200
        assert lifecycle_of(client.app).in_flight == 0


def test_wait_idle_returns_when_the_last_request_ends() -> None:
    async def scenario() -> tuple[bool, bool]:
        lifecycle = Lifecycle()
        lifecycle.request_started()
        timed_out = await lifecycle.wait_idle(0.05)  # still one in flight
        asyncio.get_running_loop().call_later(0.05, lifecycle.request_finished)
        drained = await lifecycle.wait_idle(10)
        return timed_out, drained

    assert asyncio.run(scenario()) == (False, True)
