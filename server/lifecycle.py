"""The server's drain state for a bounded graceful shutdown (Kubernetes rolling updates).

On SIGTERM `hotlora serve` (`GracefulServer`) calls `Lifecycle.begin_drain`: from then on `/ready`
answers 503 (the endpoint leaves the Service), new generation requests get a 503 with
Retry-After (the client retries on another replica) while everything else, running streams
included, is still served; the server exits once no request is in flight or the shutdown
timeout has passed. The access-log middleware counts the requests in flight (it sees every
request start and end); `DrainMiddleware` refuses the new generations.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
from collections.abc import MutableMapping
from types import FrameType
from typing import Any

import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from hotlora.server.errors import error_body

log = logging.getLogger(__name__)

# What a draining server refuses: the requests that hold an engine row (the rest are quick).
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


class Lifecycle:
    """Requests in flight and whether the server is draining; lives on `app.state.lifecycle`.

    Touched from the event loop only, except `begin_drain`, which the SIGTERM handler calls
    between two bytecodes of the loop's thread: it only flips a flag."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle: asyncio.Event | None = None  # made by wait_idle, in the serving loop

    def begin_drain(self) -> None:
        self.draining = True

    def request_started(self) -> None:
        self.in_flight += 1

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (True) or `timeout` seconds passed (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.in_flight > 0:
            left = deadline - loop.time()
            if left <= 0:
                return False
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), left)
            except TimeoutError:
                return False
            finally:
                self._idle = None
        return True


def lifecycle_of(app: object) -> Lifecycle:
    """The app's Lifecycle (`create_app` puts one on `app.state`)."""
    lifecycle: Lifecycle = app.state.lifecycle  # type: ignore[attr-defined]
    return lifecycle


class DrainMiddleware:
    """While draining, a new generation request gets a 503 with Retry-After at once (before
    its body is read), so a client or load balancer retries it on a replica that stays."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app, self.lifecycle = app, lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and self.lifecycle.draining
            and scope["method"] == "POST"
            and scope["path"] in GENERATION_PATHS
        ):
            body = error_body(503, "the server is shutting down; retry on another replica")
            # Connection: close makes a keep-alive client reconnect, through the load balancer
            headers = {"Retry-After": "1", "Connection": "close"}
            await JSONResponse(body, status_code=503, headers=headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class StartupGuard:
    """The app, but an exception of its lifespan's start-up (the engine failing to load) is
    kept in `error` for `hotlora serve` to report in one line, not handed to uvicorn's log as
    a traceback; uvicorn still sees the start-up fail and exits."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.error: BaseException | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        failed = False

        async def quiet_send(message: MutableMapping[str, Any]) -> None:
            nonlocal failed
            if message["type"] == "lifespan.startup.failed":
                failed = True
                message = {**message, "message": ""}  # starlette's traceback text
            await send(message)

        try:
            await self.app(scope, receive, quiet_send)
        except BaseException as e:
            if failed and self.error is None:
                self.error = e
            raise


class GracefulServer(uvicorn.Server):
    """uvicorn's Server, but SIGTERM drains before it stops.

    uvicorn's own SIGTERM handling closes the listening socket at once, while Kubernetes may
    still route new connections to the pod for a moment (endpoint removal races the signal):
    those would be refused. Here SIGTERM only starts the drain: the server keeps accepting,
    /ready says 503, new generations get 503s, and once nothing is in flight (or `timeout`
    seconds passed) uvicorn's usual shutdown runs (listener closed, connections closed, tasks
    cancelled if any remain, the app's lifespan stopping the engine). SIGTERM is not re-raised
    at the end as uvicorn does, so the process exits 0. A second SIGTERM stops waiting; SIGINT
    keeps uvicorn's meaning (graceful, a second one forces)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, timeout: float) -> None:
        super().__init__(config)
        self.lifecycle, self.timeout = lifecycle, timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None  # referenced: the loop keeps weak ones

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:
            # uvicorn announces only the addresses it bound itself; `hotlora serve` binds
            # before the model loads (server/preflight.py), so say it here, in uvicorn's words
            for sock in sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                logging.getLogger("uvicorn.error").info(
                    "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", shown, port
                )

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler (main thread, between two bytecodes of the loop): it flips flags and
        # hands the rest to the loop with call_soon_threadsafe, which is safe here.
        loop = self._loop
        if sig != signal.SIGTERM or loop is None or self.should_exit:
            super().handle_exit(sig, frame)
        elif self.lifecycle.draining:
            loop.call_soon_threadsafe(self._cut_now)
        else:
            self.lifecycle.begin_drain()  # /ready is 503 from the next request on
            loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        log.warning(
            "SIGTERM: draining, not ready; %d request(s) in flight get up to %g s to finish",
            self.lifecycle.in_flight,
            self.timeout,
        )
        if await self.lifecycle.wait_idle(self.timeout):
            log.warning("drained: shutting down")
            # uvicorn still waits for connections that opened meanwhile: what is left of the
            # budget, or a moment for a request that arrived just now
            # (uvicorn types it as whole seconds)
            self.config.timeout_graceful_shutdown = max(math.ceil(deadline - loop.time()), 1)
            self.should_exit = True
        else:
            log.warning(
                "shutdown timeout (%g s) passed with %d request(s) in flight: cutting them",
                self.timeout,
                self.lifecycle.in_flight,
            )
            self._cut_now()

    def _cut_now(self) -> None:
        if self._drain is not None and self._drain is not asyncio.current_task():
            self._drain.cancel()
        # uvicorn cancels the requests still running after this grace (0 would cancel even
        # its own wait for connections that already closed, and log that as an error)
        self.config.timeout_graceful_shutdown = 1
        self.should_exit = True
