"""The structured access log, request ids, the adapter audit log and the request-body limit.

`AccessLogMiddleware` is a pure ASGI middleware (BaseHTTPMiddleware would hide the moment a
streamed response ends or its client goes away): per HTTP request it picks the request id
(the client's X-Request-Id when sane, else a new one) and echoes it in the response, makes the
request's `RequestRecord` (handlers fill it: server.request_record), counts the request in
flight for the drain (server.lifecycle) and, once the response is over however it ended, runs
the record's cleanups exactly once and writes one JSON line on logger `hotlora.access`.

No line ever holds a key, the Authorization header, the query string or any prompt or
completion text: only the fields below, which handlers set to names and counts.
"""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hotlora.server.config import Settings
from hotlora.server.errors import error_body
from hotlora.server.lifecycle import DrainMiddleware, Lifecycle
from hotlora.server.request_record import RECORD_KEY, RequestRecord, new_request_id

access_log = logging.getLogger("hotlora.access")
audit_log = logging.getLogger("hotlora.audit")

# A client's id is echoed into our headers and log lines: only short, plain ones are taken
# (no spaces, quotes or control characters that could forge a line or a header).
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_CLIENT_CLOSED = 499  # nginx's status for "the client went away before the response started"


def install_request_middleware(app: Starlette, settings: Settings) -> Lifecycle:
    """Wrap the app in the access log, the drain's refusals and the body limit; the app's
    Lifecycle (which counts its requests in flight) goes on `app.state.lifecycle`."""
    lifecycle = app.state.lifecycle = Lifecycle()
    # Each add_middleware wraps the ones before it: the access log, added last, is outermost
    # and sees every request, the drain's 503s and the body limit's 413s included.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(DrainMiddleware, lifecycle=lifecycle)
    app.add_middleware(AccessLogMiddleware, lifecycle=lifecycle, enabled=settings.access_log)
    return lifecycle


def request_id_from(headers: Headers) -> str:
    """The client's X-Request-Id if it is sane, else a new id."""
    given = headers.get("x-request-id", "")
    return given if _SANE_ID.fullmatch(given) else new_request_id()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _line(kind: str, fields: dict[str, Any]) -> str:
    # "log" first: access and audit lines share a stream, and a log pipeline routes on it.
    # ensure_ascii: a name with a newline or odd bytes stays on one escaped line.
    return json.dumps({"log": kind, **fields}, separators=(",", ":"), ensure_ascii=True)


class AccessLogMiddleware:
    """Request id, record, in-flight count, cleanups and the access-log line (see module doc)."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle, enabled: bool = True) -> None:
        self.app, self.lifecycle, self.enabled = app, lifecycle, enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        record = RequestRecord(request_id_from(Headers(scope=scope)))
        scope.setdefault("state", {})[RECORD_KEY] = record
        id_header = (b"x-request-id", record.request_id.encode())
        status: int | None = None
        completed = False  # the last body chunk went out
        finished = False
        self.lifecycle.request_started()

        def finish() -> None:
            """Once per request: on its last body chunk, or when the app returned or raised
            without sending one (an error, a client that went away mid-stream)."""
            nonlocal finished
            if finished:
                return
            finished = True
            self.lifecycle.request_finished()
            record.finish()
            if self.enabled:
                access_log.info(self._fields(scope, record, status, completed, start))

        async def send_logged(message: Message) -> None:
            nonlocal status, completed
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k != id_header[0]]
                message = {**message, "headers": [*headers, id_header]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True
                finish()

        try:
            await self.app(scope, receive, send_logged)
        except Exception:
            if status is None:
                # Starlette's outermost error middleware would send the 500 without our id
                # header (it runs outside us); sending it here makes it skip its own, and
                # the re-raise still reaches its handler, which logs the traceback.
                status = 500
                try:
                    body = error_body(500, "internal server error")
                    await JSONResponse(body, status_code=500)(scope, receive, send_logged)
                except Exception:  # the client is gone: nothing to tell it
                    pass
            raise
        except BaseException:  # cancelled (shutdown past its timeout): nobody got an answer
            if status is None:
                status = _CLIENT_CLOSED
            raise
        finally:
            if status is None:  # the app returned without answering: its client went away
                status = _CLIENT_CLOSED
            finish()

    @staticmethod
    def _fields(
        scope: Scope, record: RequestRecord, status: int | None, completed: bool, start: float
    ) -> str:
        client = scope.get("client")
        return _line(
            "access",
            {
                "timestamp": _now(),
                "request_id": record.request_id,
                "method": scope["method"],
                "path": scope["path"],  # the query string never: it may carry a key
                "status": status,
                "latency_ms": round((time.perf_counter() - start) * 1000, 3),
                "principal": record.principal,
                "tenant": record.tenant,
                "model": record.model,
                "adapter": record.adapter,
                "prompt_tokens": record.prompt_tokens,
                "completion_tokens": record.completion_tokens,
                "client": client[0] if client else None,
                "completed": completed,  # false: the client went away or the stream was cut
            }
        )


def audit(
    action: str,
    record: RequestRecord,
    *,
    name: str,
    version: int | None,
    sha256: str | None,
    outcome: str,
) -> None:
    """One JSON line on logger `hotlora.audit` for an adapter mutation (upload, delete, load,
    unload): who did what to which adapter version, and how it ended."""
    audit_log.info(
        _line(
            "audit",
            {
                "timestamp": _now(),
                "request_id": record.request_id,
                "principal": record.principal,
                "tenant": record.tenant,
                "action": action,
                "name": name,
                "version": version,
                "sha256": sha256,
                "outcome": outcome,
            }
        )
    )


class BodyLimitMiddleware:
    """A 413 for a request body over `max_bytes`, but for multipart adapter uploads (bounded
    by max_upload_bytes where they are read). Decided from Content-Length when there is one,
    before anything is read; a body without one (chunked) is read up front, counting, and is
    refused as soon as it passes the limit, so at most the limit is ever held."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if _is_upload(scope, headers):
            await self.app(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None:
            # the server holds the body to its Content-Length (an invalid one never gets here)
            if length.isdigit() and int(length) > self.max_bytes:
                await self._too_large(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        # Any body reaches the JSON parser (FastAPI reads one without a content type as JSON),
        # so the limit covers every content type but the upload's.
        held: list[Message] = []
        size = 0
        while True:
            message = await receive()
            held.append(message)
            if message["type"] != "http.request":  # http.disconnect: let the app see it
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                held.clear()
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return held.pop(0) if held else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = error_body(
            413, f"the request body is larger than the server's limit of {self.max_bytes} bytes"
        )
        # Connection: close: the rest of the body is never read, so the connection cannot
        # carry another request
        response = JSONResponse(body, status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


def _is_upload(scope: Scope, headers: Headers) -> bool:
    return (
        scope["method"] == "POST"
        and scope["path"] == "/v1/adapters"
        and headers.get("content-type", "").lower().startswith("multipart/form-data")
    )
