"""The access log (one JSON line per request on `hotlora.access`), request ids, the audit
helper, the record's cleanups (exactly once, however a response ends), no secret in any log
line, and the JSON body limit (413)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from hotlora.server.access_log import audit, install_request_middleware
from hotlora.server.errors import APIError, error_body, install_error_handlers
from hotlora.server.lifecycle import Lifecycle
from hotlora.server.request_record import RequestRecord, record_of
from tests.server.support import (
    DEMO,
    LiveServer,
    assert_error,
    bearer,
    complete,
    demo_files,
    free_port,
    make_settings,
    serve,
    sse_chunks,
    upload,
)

ADMIN_KEY = "adm-Qx7Lp2Zr9Wv4"
API_KEY = "usr-Kd8Ns3Yt6Hj1"
WRONG_KEY = "bad-Mf5Gc2Vb8Tn0"
MARKER = "qzvkjx"  # a prompt no log line may repeat (the base model copies it into its answer)
LIMIT = 4096  # max_body_bytes of the apps below
FIELDS = {
    "log", "timestamp", "request_id", "method", "path", "status", "latency_ms", "principal",
    "tenant", "model", "adapter", "prompt_tokens", "completion_tokens", "client", "completed",
}  # fmt: skip
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "hotlora.access"]


def line_for(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    """The one access line of a request (a request never gets two)."""
    lines = [x for x in access_lines(caplog) if x["request_id"] == request_id]
    assert len(lines) == 1, access_lines(caplog)
    return lines[0]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("access")
    settings = make_settings(
        root, admin_key=ADMIN_KEY, api_keys=[API_KEY], max_body_bytes=LIMIT, engine_process=False
    )
    with serve(settings) as c:
        yield c


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="hotlora.access")
    return caplog


def test_completion_line_has_every_field(
    client: TestClient, access: pytest.LogCaptureFixture
) -> None:
    r = client.post(
        "/v1/completions?trace=abc",
        json={"model": "reverse", "prompt": "in: hello\nout:", "max_tokens": 24, "temperature": 0},
        headers={**bearer(API_KEY), "X-Request-Id": "client-id_1.2:3"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "client-id_1.2:3"
    line = line_for(access, "client-id_1.2:3")
    assert set(line) == FIELDS
    assert line["log"] == "access"  # access and audit lines share a stream: the kind routes
    usage = r.json()["usage"]
    assert line["method"] == "POST" and line["path"] == "/v1/completions"  # no query string
    assert line["status"] == 200 and line["completed"] is True
    assert line["model"] == "reverse" and line["adapter"] == "reverse@1"
    assert line["prompt_tokens"] == usage["prompt_tokens"] > 0
    assert line["completion_tokens"] == usage["completion_tokens"] > 0
    assert line["principal"] == "api-key" and line["tenant"] is None
    assert line["client"] == "testclient"
    assert 0 < line["latency_ms"] < 60_000
    assert datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).tzinfo is not None


def test_streamed_completion_line_counts_the_streamed_tokens(
    client: TestClient, access: pytest.LogCaptureFixture
) -> None:
    r = complete(
        client, DEMO, headers=bearer(API_KEY), n=2, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    usage = sse_chunks(r)[-1]["usage"]
    line = line_for(access, r.headers["x-request-id"])
    assert GENERATED_ID.fullmatch(line["request_id"])
    assert line["status"] == 200 and line["completed"] is True
    assert line["model"] == DEMO and line["adapter"] is None
    assert line["prompt_tokens"] == usage["prompt_tokens"] > 0
    assert line["completion_tokens"] == usage["completion_tokens"] > 0


def test_chat_line_counts_tokens(client: TestClient, access: pytest.LogCaptureFixture) -> None:
    body = {"model": "upper", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    r = client.post("/v1/chat/completions", json=body, headers=bearer(API_KEY))
    assert r.status_code == 200, r.text
    line = line_for(access, r.headers["x-request-id"])
    assert line["completion_tokens"] == r.json()["usage"]["completion_tokens"] > 0
    assert line["adapter"] == "upper@1"


@pytest.mark.parametrize(
    "given", ["", "has space", "x" * 129, 'quote"d', "back\\slash", "é".encode("latin-1")]
)
def test_a_4xx_gets_a_line_and_an_insane_client_id_is_replaced(
    client: TestClient, access: pytest.LogCaptureFixture, given: str | bytes
) -> None:
    headers: dict[str, Any] = {**bearer(API_KEY), "X-Request-Id": given}
    r = client.post("/v1/completions", json={"model": "no-such", "prompt": "x"}, headers=headers)
    assert_error(r, 404, param="model")
    rid = r.headers["x-request-id"]
    assert GENERATED_ID.fullmatch(rid), rid
    line = line_for(access, rid)
    assert line["status"] == 404 and line["path"] == "/v1/completions"
    assert line["prompt_tokens"] == line["completion_tokens"] == 0


def test_an_auth_failure_gets_a_line(client: TestClient, access: pytest.LogCaptureFixture) -> None:
    r = client.get("/v1/models", headers=bearer(WRONG_KEY))
    assert_error(r, 403)
    assert line_for(access, r.headers["x-request-id"])["status"] == 403


def test_adapter_upload_line(client: TestClient, access: pytest.LogCaptureFixture) -> None:
    # the weights (528 kB) are far over the JSON body limit: multipart uploads are exempt
    r = upload(client, "logged", *demo_files("upper"), headers=bearer(ADMIN_KEY))
    assert r.status_code == 201, r.text
    line = line_for(access, r.headers["x-request-id"])
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/adapters", 201)
    assert line["principal"] == "admin"


def test_audit_writes_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hotlora.audit")
    record = RequestRecord("rid-1", principal="admin", tenant="acme")
    audit("upload", record, name="acme/tuned", version=3, sha256="ab" * 32, outcome="ok")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "hotlora.audit"]
    assert len(lines) == 1
    line = lines[0]
    assert set(line) == {
        "log", "timestamp", "request_id", "principal", "tenant", "action", "name", "version",
        "sha256", "outcome",
    }  # fmt: skip
    assert line["log"] == "audit"
    assert line["request_id"] == "rid-1" and line["principal"] == "admin"
    assert (line["tenant"], line["action"], line["name"]) == ("acme", "upload", "acme/tuned")
    assert (line["version"], line["sha256"], line["outcome"]) == (3, "ab" * 32, "ok")


def test_access_log_off_writes_nothing(tmp_path: Path, access: pytest.LogCaptureFixture) -> None:
    app = _bare_app(tmp_path, [], access_log=False)
    with TestClient(app) as c:
        r = c.get("/ok")
    assert r.status_code == 200 and "x-request-id" in r.headers
    assert access_lines(access) == []


# --- no secret in any log line ---------------------------------------------------------------


def test_no_key_prompt_or_completion_in_any_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, the start-up's settings line included
    settings = make_settings(tmp_path, admin_key=ADMIN_KEY, api_keys=[API_KEY],
                             engine_process=False)  # fmt: skip
    prompt = f"in: {MARKER}\nout:"
    with serve(settings) as c:
        user, admin = bearer(API_KEY), bearer(ADMIN_KEY)
        r = complete(c, DEMO, prompt, headers=user)
        assert MARKER in r.json()["choices"][0]["text"]  # the completion repeats it
        assert complete(c, DEMO, prompt, headers=user, stream=True).status_code == 200
        assert complete(c, DEMO, prompt, headers=admin, n=2, logprobs=2).status_code == 200
        chat = {"model": DEMO, "messages": [{"role": "user", "content": MARKER}]}
        assert c.post("/v1/chat/completions", json=chat, headers=user).status_code == 200
        assert c.post("/tokenize", json={"prompt": prompt}, headers=user).status_code == 200
        assert c.post("/v1/completions", json={"model": DEMO, "prompt": prompt},
                      headers=bearer(WRONG_KEY)).status_code == 403  # fmt: skip
        assert complete(c, DEMO, prompt).status_code == 401
        assert upload(c, "s", *demo_files("pirate"), headers=admin).status_code == 201
        assert c.delete("/v1/adapters/s", headers=admin).status_code == 200
        assert complete(c, DEMO, MARKER * 1000, headers=user).status_code == 400  # too long
    assert access_lines(caplog), "the access log wrote nothing"
    everything = caplog.text + "\n".join(repr(vars(r)) for r in caplog.records)
    for secret in (ADMIN_KEY, API_KEY, WRONG_KEY, MARKER, "Bearer"):
        assert secret not in everything, f"{secret!r} was logged"


# --- the JSON body limit ---------------------------------------------------------------------


def _big_body() -> bytes:
    body = json.dumps({"model": DEMO, "prompt": "x" * (LIMIT + 100), "max_tokens": 1}).encode()
    assert len(body) > LIMIT
    return body


def test_a_body_over_the_limit_is_413(client: TestClient, access: pytest.LogCaptureFixture) -> None:
    r = client.post(
        "/v1/completions", content=_big_body(),
        headers={**bearer(API_KEY), "Content-Type": "application/json"},
    )  # fmt: skip
    assert_error(r, 413, contains=str(LIMIT))
    assert line_for(access, r.headers["x-request-id"])["status"] == 413


def test_a_chunked_body_over_the_limit_is_413(
    client: TestClient, access: pytest.LogCaptureFixture
) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        body = _big_body()
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    headers = {**bearer(API_KEY), "Content-Type": "application/json"}
    r = client.post("/v1/completions", content=chunks(), headers=headers)
    assert_error(r, 413)
    assert line_for(access, r.headers["x-request-id"])["status"] == 413


def test_a_chunked_body_under_the_limit_is_served(client: TestClient) -> None:
    body = json.dumps({"model": "upper", "prompt": "in: hello\nout:", "temperature": 0})

    def chunks() -> Iterator[bytes]:
        yield body[:10].encode()
        yield body[10:].encode()

    headers = {**bearer(API_KEY), "Content-Type": "application/json"}
    r = client.post("/v1/completions", content=chunks(), headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == " HELLO"


def test_a_413_over_a_real_socket(tmp_path: Path) -> None:
    with _running(_bare_app(tmp_path, [])) as url:
        r = httpx.post(f"{url}/echo", content=b"{" + b" " * LIMIT + b"}",
                       headers={"Content-Type": "application/json"})  # fmt: skip
        assert_error(r, 413)
        r = httpx.post(f"{url}/echo", json={"a": "b"})
        assert r.status_code == 200 and r.json() == {"a": "b"}


# --- cleanups: exactly once, however the response ends ----------------------------------------


def _bare_app(root: Path, ran: list[str], access_log: bool = True) -> FastAPI:
    """The server's middleware and error handlers around routes that register a cleanup."""
    app = FastAPI()
    install_error_handlers(app)
    install_request_middleware(app, make_settings(root, max_body_bytes=LIMIT,
                                                  access_log=access_log))  # fmt: skip

    def hold(request: Request, name: str) -> None:
        record_of(request).cleanups.append(lambda: ran.append(name))

    @app.get("/ok")
    async def ok(request: Request) -> dict[str, str]:
        hold(request, "ok")
        return {"ok": "yes"}

    @app.get("/refused")
    async def refused(request: Request) -> None:
        hold(request, "refused")
        raise APIError(429, "too many requests right now")

    @app.get("/boom")
    async def boom(request: Request) -> None:
        hold(request, "boom")
        raise RuntimeError("a bug")

    @app.get("/forever")
    async def forever(request: Request) -> StreamingResponse:
        hold(request, "forever")

        async def events() -> AsyncIterator[str]:
            while True:
                yield "data: tick\n\n"
                await asyncio.sleep(0.01)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/echo")
    async def echo(request: Request) -> Any:
        return await request.json()

    return app


def _lifecycle(app: FastAPI) -> Lifecycle:
    lifecycle: Lifecycle = app.state.lifecycle
    return lifecycle


@pytest.mark.parametrize(("path", "status"), [("/ok", 200), ("/refused", 429), ("/boom", 500)])
def test_cleanups_run_once_for_answers_and_errors(
    tmp_path: Path, access: pytest.LogCaptureFixture, path: str, status: int
) -> None:
    ran: list[str] = []
    app = _bare_app(tmp_path, ran)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get(path, headers={"X-Request-Id": "abc"})
    assert r.status_code == status
    if status == 500:
        assert r.json() == error_body(500, "internal server error")
    elif status != 200:
        assert_error(r, status)
    assert r.headers["x-request-id"] == "abc"  # the 500 too
    assert ran == [path.strip("/")]
    assert line_for(access, "abc")["status"] == status
    assert _lifecycle(app).in_flight == 0


@contextmanager
def _running(app: FastAPI) -> Iterator[str]:
    """`app` on a real uvicorn (a thread of this process): clients can really go away."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: server.started, "uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _wait_for(done: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _read_one_event_then_leave(url: str, body: dict[str, Any] | None = None) -> str:
    """Start a stream, read its first event, close the connection; the response's id."""
    with httpx.Client(timeout=30) as http:
        method = "GET" if body is None else "POST"
        with http.stream(method, url, json=body) as r:
            assert r.status_code == 200
            rid = r.headers["x-request-id"]
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break
    return rid


def test_cleanups_run_once_when_the_client_leaves_mid_stream(
    tmp_path: Path, access: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []
    app = _bare_app(tmp_path, ran)
    with _running(app) as url:
        rid = _read_one_event_then_leave(f"{url}/forever")
        _wait_for(lambda: ran, "the cleanup")
        time.sleep(0.3)  # a second run would come now
        assert ran == ["forever"]
        line = line_for(access, rid)
        assert line["status"] == 200 and line["completed"] is False
        assert _lifecycle(app).in_flight == 0


def test_a_completion_stream_the_client_leaves_gets_its_line(
    tmp_path: Path, access: pytest.LogCaptureFixture
) -> None:
    # max_running 1 and 8 choices of 100 tokens: a stream of a few seconds, left after 1 event
    settings = make_settings(tmp_path, port=free_port(), max_running=1, engine_process=False)
    with LiveServer(settings) as live:
        body = {"model": "reverse", "prompt": "in: hello\nout:", "max_tokens": 100, "n": 8,
                "ignore_eos": True, "stream": True}  # fmt: skip
        rid = _read_one_event_then_leave(f"{live.url}/v1/completions", body)
        _wait_for(lambda: [x for x in access_lines(access) if x["request_id"] == rid], "line")
        line = line_for(access, rid)
        assert line["completed"] is False and line["status"] == 200
        assert line["adapter"] == "reverse@1" and line["prompt_tokens"] > 0
        assert 0 < line["completion_tokens"] < 800  # what was made before the abort
        assert _lifecycle(live.app).in_flight == 0
