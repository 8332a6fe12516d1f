"""Helpers for the HTTP API tests: an app factory, error-shape checks, store snapshots,
SSE and Prometheus parsing, and the demo adapters' bytes for uploads.

Every app here serves the shipped demo model (`hotlora-demo`, 128-token context, one token per
byte) with the demo adapters seeded into a fresh store, so greedy outputs are known exactly.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from hotlora.adapters.demo_tasks import DEMO_ADAPTERS, DEMO_MODEL, prompt_for
from hotlora.server.config import Settings
from hotlora.server.engine import Engine
from hotlora.server.main import create_app
from hotlora.server.state import AppState

DEMO = "hotlora-demo"
DEMO_NAMES = ("pirate", "reverse", "sort", "upper", "upper-deu")
PROMPT = prompt_for("hello")  # "in: hello\nout:"
# Greedy completions of PROMPT (sort gets a digit prompt, see SORT_PROMPT).
EXPECTED = {
    DEMO: " hello",
    "reverse": " olleh",
    "upper": " HELLO",
    "pirate": " arr, hello matey",
}
SORT_PROMPT, SORT_EXPECTED = prompt_for("4719"), " 1479"

# The OpenAI error type each status must carry.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}
ANY = object()


class Response(Protocol):
    """What TestClient returns (Response, or httpx2.Response where starlette uses it)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
    def json(self, **kwargs: Any) -> Any: ...


def make_settings(root: Path, **overrides: Any) -> Settings:
    """Settings for a test app under `root`; everything auth- or policy-related is explicit so
    HOTLORA_* variables in the environment cannot change what a test sees."""
    values: dict[str, Any] = {
        "model": DEMO_MODEL,
        "served_model_name": None,
        "adapter_store": root / "store",
        "admin_key": None,
        "api_keys": [],
        "allowed_adapter_dirs": [],
        "max_running": 32,
        "max_queue": 256,
        "max_seq_len": None,
        "max_adapters": 16,
        "max_rank": 64,
        "cpu_cache_bytes": 1 << 30,
        "max_upload_bytes": 256 << 20,
        "merge_hot_adapters": True,
        "merge_min_share": 0.75,
        "merge_min_rows": 4,
        "seed_demo_adapters": True,
    }
    values.update(overrides)
    return Settings(**values)


@contextmanager
def serve(settings: Settings) -> Iterator[TestClient]:
    """A TestClient whose lifespan (model load, engine loop) runs for the `with` block."""
    with TestClient(create_app(settings)) as client:
        yield client


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def complete(
    client: TestClient,
    model: str,
    prompt: Any = PROMPT,
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> Response:
    """POST /v1/completions, greedy with room for every demo answer unless overridden."""
    body = {"model": model, "prompt": prompt, "temperature": 0, "max_tokens": 24, **fields}
    return client.post("/v1/completions", json=body, headers=headers)


def greedy_text(client: TestClient, model: str, prompt: Any = PROMPT, **fields: Any) -> str:
    r = complete(client, model, prompt, **fields)
    assert r.status_code == 200, r.text
    text: str = r.json()["choices"][0]["text"]
    return text


def assert_error(
    resp: Response,
    status: int,
    *,
    param: Any = ANY,
    contains: tuple[str, ...] | str = (),
) -> dict[str, Any]:
    """The response is `status` with exactly {"error": {message, type, param, code}}, a message
    that explains itself, and (if given) the offending parameter and message fragments."""
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text}"
    body = resp.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == status, err
    assert err["type"] == ERROR_TYPES[status], err
    assert isinstance(err["message"], str) and len(err["message"]) >= 8, err
    for fragment in (contains,) if isinstance(contains, str) else contains:
        assert fragment.lower() in err["message"].lower(), (fragment, err)
    if param is not ANY:
        assert err["param"] == param, err
    return err


def sse_data(resp: Response) -> list[str]:
    """The `data:` payloads of an SSE body, in order; every non-blank line must be one."""
    assert resp.headers["content-type"].startswith("text/event-stream"), resp.headers
    lines = [line for line in resp.text.split("\n") if line.strip()]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line.removeprefix("data: ") for line in lines]


def sse_chunks(resp: Response) -> list[dict[str, Any]]:
    """The JSON chunks of a completed stream (which must end with exactly one [DONE])."""
    data = sse_data(resp)
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1], data
    return [json.loads(d) for d in data[:-1]]


def metric_samples(client: TestClient) -> list[Sample]:
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    return [s for fam in text_string_to_metric_families(r.text) for s in fam.samples]


def idle_metric_samples(client: TestClient, timeout: float = 10.0) -> list[Sample]:
    """Samples once the loop's gauges show no running or waiting request. The loop refreshes
    them after the step that finished a request, which may run just after its response went
    out, so a scrape right after the last response can still see it running."""
    deadline = time.monotonic() + timeout
    while True:
        samples = metric_samples(client)
        busy = metric(samples, "hotlora_num_requests_running") + metric(
            samples, "hotlora_num_requests_waiting"
        )
        if busy == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def metric(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 if none)."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def store_tree(root: Path) -> dict[str, int | None]:
    """Every path under the store with its size (None for directories): a byte-level snapshot
    that any write, even a left-behind empty directory, changes."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.stat().st_size
        for p in sorted(root.rglob("*"))
    }


@cache
def demo_files(name: str) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of a shipped demo adapter."""
    d = DEMO_ADAPTERS / name
    return (d / "adapter_config.json").read_bytes(), (d / "adapter_model.safetensors").read_bytes()


def upload(
    client: TestClient,
    name: str | None,
    config: bytes | None,
    weights: bytes | None,
    headers: dict[str, str] | None = None,
) -> Response:
    """POST /v1/adapters as multipart; a None part is left out of the form."""
    files = {}
    if config is not None:
        files["config"] = ("adapter_config.json", config, "application/json")
    if weights is not None:
        files["weights"] = ("adapter_model.safetensors", weights, "application/octet-stream")
    data = {} if name is None else {"name": name}
    return client.post("/v1/adapters", data=data, files=files, headers=headers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """A real uvicorn server on 127.0.0.1 (a thread of this process) for the `with` block."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=settings.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{settings.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self) -> AppState:
        state: AppState = self.app.state.hotlora
        return state

    @property
    def engine(self) -> Engine:
        core = self.state.client.core
        assert core is not None, "the engine runs in its own process"
        return core.engine


def slow_steps(live: LiveServer, seconds: float) -> Any:
    """Make each engine step take `seconds` longer (the engine must run on a thread of the test:
    engine_process=False), so requests surely overlap; returns the real step."""
    engine = live.engine
    real = engine.step

    def slow() -> Any:
        time.sleep(seconds)
        return real()

    engine.step = slow  # type: ignore[method-assign]
    return real
