"""hotlora on Ray Serve: N engine replicas behind one OpenAI-compatible ingress.

    hotlora serve --replicas 2                       # a local Ray cluster (or --ray-address)
    serve run hotlora.server.ray_app:app                     # settings from HOTLORA_* (replicas: 1)
    serve run hotlora.server.ray_app:build_app replicas=2    # the same, settings as arguments

`HotloraReplica` runs the single-process server's own app (`server.main.create_app`: routes,
auth, errors, metrics, its engine loop) and answers each forwarded request by calling that app
in-process, streaming the body back chunk by chunk. `HotloraIngress` (FastAPI) forwards every
request to a replica, routed by Ray Serve's model multiplexing: `multiplexed_model_id` is the
adapter a completion names (base-model requests and everything else: the least loaded replica),
and every replica keeps at most `max_adapters` ids (its device slots), so one adapter's requests
stay where it is resident. Every response carries `X-Hotlora-Replica`.

All replicas open one adapter store (a directory each can read and write) with `shared_store`:
an upload or delete goes through one replica, which commits it by the store's atomic rename, and
every replica resolves `model` against the disk per request (`AdapterStore.latest_fresh`).

A replica that dies is restarted by Ray Serve; a request on it ends with a 503 (`Retry-After`),
or an error event when streamed, and requests on other replicas go on.
"""

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import SecretStr
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from hotlora.server.cli_errors import LoadError, UsageError, one_line
from hotlora.server.config import Settings
from hotlora.server.ray_metrics import PUSH_INTERVAL_S, MetricsBoard

log = logging.getLogger("hotlora.ray")

REPLICA_HEADER = "x-hotlora-replica"
# Requests whose JSON body names a model that picks the replica (adapter affinity).
ROUTED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# Hop-by-hop, or set by the ingress and Ray Serve's proxy themselves (x-request-id: the same id).
_DROP_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "date", "server", "x-request-id"}
)

Head = dict[str, Any]  # {"status": int, "headers": [[name, value], ...], "replica": str}
Chunk = Head | bytes


def settings_kwargs(settings: Settings) -> dict[str, Any]:
    """Settings as plain values a replica can rebuild them from (secrets included)."""
    out: dict[str, Any] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, list):
            value = [v.get_secret_value() if isinstance(v, SecretStr) else str(v) for v in value]
        elif value is not None and not isinstance(value, str | int | float | bool):
            value = str(value)  # paths
        out[name] = value
    return out


def _error_body(status: int, message: str, kind: str) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": status}}
    ).encode()


def _unavailable(message: str) -> Response:
    return Response(
        _error_body(503, message, "service_unavailable"),
        status_code=503,
        media_type="application/json",
        headers={"Retry-After": "1"},
    )


# ---------------------------------------------------------------------------- the replica


class _ASGICall:
    """One HTTP request through an ASGI app in this process; the response as a head and body
    chunks. Closing the iterator early (the client went away) is a disconnect for the app."""

    def __init__(self, app: Callable[..., Awaitable[None]], scope: dict[str, Any], body: bytes):
        self.app, self.scope, self.body = app, scope, body
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.disconnected = asyncio.Event()
        self._body_sent = False

    async def _receive(self) -> dict[str, Any]:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        await self.queue.put(message)

    async def _run(self) -> None:
        try:
            await self.app(self.scope, self._receive, self._send)
        except Exception:  # the app's error handlers answered already, if they could
            log.exception("request %s %s failed", self.scope["method"], self.scope["path"])
        finally:
            await self.queue.put(None)

    async def __call__(self) -> AsyncIterator[dict[str, Any]]:
        task = asyncio.create_task(self._run())
        try:
            while (msg := await self.queue.get()) is not None:
                yield msg
                if msg["type"] == "http.response.body" and not msg.get("more_body", False):
                    break
        finally:
            self.disconnected.set()
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(task, timeout=5)


@serve.deployment(name="HotloraReplica")
class HotloraReplica:
    """One hotlora server (API + engine loop) without its own HTTP port."""

    async def __init__(  # type: ignore[misc]  # Ray Serve awaits an async __init__
        self, settings: dict[str, Any], board: DeploymentHandle | None = None
    ) -> None:
        from hotlora.server.main import create_app

        self.settings = Settings(**settings)
        self.app = create_app(self.settings)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.state = self.app.state.hotlora
        self.name = serve.get_replica_context().replica_id.unique_id
        self.board = board

        async def record(model_id: str) -> str:
            # hotlora's engine loads adapters itself; this only tells Ray Serve's router which
            # adapters this replica serves (affinity), bounded by its device slots.
            return model_id

        self._record = serve.multiplexed(max_num_models_per_replica=self.settings.max_adapters)(
            record
        )
        self._tasks = [asyncio.create_task(self._push_metrics())]
        log.info("replica %s serving %s", self.name, self.settings.model_id)

    async def _push_metrics(self) -> None:
        while self.board is not None:
            with contextlib.suppress(Exception):  # a board restarting: next time
                text = self.state.metrics.render() + await self.state.client.core_metrics()
                await self.board.put.remote(self.name, text.decode())
            await asyncio.sleep(PUSH_INTERVAL_S)

    async def handle(
        self, method: str, path: str, query: bytes, headers: list[tuple[str, str]], body: bytes
    ) -> AsyncIterator[Chunk]:
        """The response to one request: a head, then body chunks (Ray streams them)."""
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            "client": ("127.0.0.1", 0),
            "server": ("hotlora-replica", 80),
            "state": {},
        }
        model_id = serve.get_multiplexed_model_id()
        call = _ASGICall(self.app, scope, body)
        started = False
        async for msg in call():
            if msg["type"] == "http.response.start":
                started = True
                status = int(msg["status"])
                if model_id and status < 400:
                    await self._record(model_id)  # only adapters that exist take a place
                raw = msg.get("headers", [])
                yield {
                    "status": status,
                    "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in raw],
                    "replica": self.name,
                }
            elif msg["type"] == "http.response.body" and msg.get("body"):
                yield bytes(msg["body"])
        if not started:
            yield {
                "status": 500,
                "headers": [["content-type", "application/json"]],
                "replica": self.name,
            }
            yield _error_body(500, "the replica failed to answer", "internal_error")

    async def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine is gone."""
        if not self.state.client.running:
            raise RuntimeError("the engine loop is not running")

    async def __del__(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await self._lifespan.__aexit__(None, None, None)


# ---------------------------------------------------------------------------- the ingress

ingress_api = FastAPI(
    title="hotlora (Ray Serve ingress)", docs_url=None, redoc_url=None, openapi_url=None
)


def routing_model(method: str, path: str, body: bytes, base_id: str) -> str:
    """The multiplexed model id of a request: the adapter a completion names, else ''."""
    if method != "POST" or path not in ROUTED_PATHS or not body:
        return ""
    try:
        payload = json.loads(body)
    except ValueError:
        return ""
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, str) or model == base_id or not 0 < len(model) <= 200:
        return ""
    return model


async def _relay_stream(gen: AsyncIterator[Chunk], method: str, path: str) -> AsyncIterator[bytes]:
    """The replica's SSE chunks; if it dies mid-stream, an error event (as the single server
    sends when its engine dies) ends the stream."""
    try:
        async for chunk in gen:
            assert isinstance(chunk, bytes)
            yield chunk
    except ray.exceptions.RayError as e:
        log.warning("%s %s: replica failed mid-stream: %r", method, path, e)
        body = _error_body(503, "the replica serving this stream failed", "service_unavailable")
        yield b"data: " + body + b"\n\n"


@serve.deployment(name="HotloraIngress")
@serve.ingress(ingress_api)
class HotloraIngress:
    # (No `from __future__ import annotations` in this module: FastAPI reads these routes'
    # annotations at runtime, through Ray Serve's rewrite of the class.)
    """The OpenAI-compatible front: forwards every request to a replica (see the module doc)."""

    def __init__(
        self, settings: dict[str, Any], replicas: DeploymentHandle, board: DeploymentHandle
    ) -> None:
        self.settings = Settings(**settings)
        self.base_id = self.settings.model_id
        self.replicas, self.board = replicas, board

    @ingress_api.get("/metrics")
    async def metrics(self) -> Response:
        """Every replica's metrics, each sample labelled replica="<id>"."""
        text = await self.board.merged.remote()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @ingress_api.get("/metrics/replica/{replica}")
    async def replica_metrics(self, replica: str) -> Response:
        """One replica's metrics as it renders them (a per-replica scrape path)."""
        text = await self.board.one.remote(replica)
        if text is None:
            known = await self.board.replicas.remote()
            return Response(
                _error_body(404, f"no replica {replica!r}; replicas: {known}", "not_found_error"),
                status_code=404,
                media_type="application/json",
            )
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @ingress_api.api_route("/{path:path}", methods=METHODS)
    async def forward(self, path: str, request: Request) -> Response:
        body = await request.body()
        method, url_path = request.method, request.url.path
        model_id = routing_model(method, url_path, body, self.base_id)
        headers = [(k, v) for k, v in request.headers.items() if k != "host"]
        handle = self.replicas.options(multiplexed_model_id=model_id, stream=True)
        gen = cast(
            DeploymentResponseGenerator[Chunk],
            handle.handle.remote(method, url_path, request.url.query.encode(), headers, body),
        )
        try:
            head = await gen.__anext__()
        except (ray.exceptions.RayError, StopAsyncIteration, RuntimeError) as e:
            log.warning("%s %s: replica failed before answering: %r", method, url_path, e)
            return _unavailable("the replica serving this request failed; retry it")
        assert isinstance(head, dict)
        out_headers = {k: v for k, v in head["headers"] if k.lower() not in _DROP_HEADERS}
        out_headers[REPLICA_HEADER] = head["replica"]
        status = int(head["status"])
        if out_headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(
                _relay_stream(gen, method, url_path), status_code=status, headers=out_headers
            )
        chunks: list[bytes] = []
        try:
            async for chunk in gen:
                assert isinstance(chunk, bytes)
                chunks.append(chunk)
        except ray.exceptions.RayError as e:
            log.warning("%s %s: replica failed mid-response: %r", method, url_path, e)
            return _unavailable("the replica serving this request failed; retry it")
        return Response(b"".join(chunks), status_code=status, headers=out_headers)


# ---------------------------------------------------------------------------- building it


def application(settings: Settings) -> Any:
    """The Ray Serve application (a bound ingress) for `settings`."""
    kwargs = settings_kwargs(settings)
    kwargs["shared_store"] = True  # every replica writes and reads the one store
    replicas = settings.replicas or 1
    per_replica = settings.max_running + settings.max_queue  # its own 429s apply past this
    board = cast(Any, MetricsBoard).bind()
    replica = (
        cast(Any, HotloraReplica)
        .options(
            num_replicas=replicas,
            max_ongoing_requests=per_replica,
            ray_actor_options={
                "num_cpus": settings.replica_num_cpus,
                "num_gpus": settings.replica_num_gpus,
            },
            health_check_period_s=5,
        )
        .bind(kwargs, board)
    )
    return (
        cast(Any, HotloraIngress)
        .options(
            num_replicas=1,
            max_ongoing_requests=replicas * per_replica,
            ray_actor_options={"num_cpus": 0},
        )
        .bind(kwargs, replica, board)
    )


def build_app(args: dict[str, Any]) -> Any:
    """`serve run hotlora.server.ray_app:build_app name=value ...`: settings by field name."""
    return application(Settings(**args))


def __getattr__(name: str) -> Any:
    # `serve run hotlora.server.ray_app:app` (and a RayService's import_path): settings from
    # HOTLORA_*.
    if name == "app":
        return application(Settings())
    raise AttributeError(name)


def serve_forever(settings: Settings) -> int:
    """`hotlora serve --replicas N`: start or join Ray, deploy, block until SIGINT or SIGTERM,
    then stop Serve and a Ray cluster this process started, leaving none of its processes
    behind (server/process_tree.py), in under 10 s. The caller should end the process next
    without Ray's exit hooks (`os._exit`): they would shut Ray down again, waiting on a
    cluster that is gone."""
    import signal

    from hotlora.server.process_tree import ProcessTree

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    tree = ProcessTree()
    tree.watch()  # from before ray.init: every process the cluster starts is recorded
    own_cluster = False
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGTERM, stop)
    try:
        try:
            ray.init(address=settings.ray_address, ignore_reinit_error=True)
        except ConnectionError as e:
            raise UsageError(
                f"cannot join the Ray cluster at {settings.ray_address!r} "
                f"({one_line(str(e))}); check --ray-address / HOTLORA_RAY_ADDRESS"
            ) from e
        tree.track()
        own_cluster = bool(tree.alive())  # joined a running cluster: none are this run's
        # ray.init puts its own SIGTERM handlers in place (the core worker's aborts the
        # process with a stack dump, before any cleanup): this one stops as SIGINT does.
        signal.signal(signal.SIGTERM, stop)
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            serve.run(application(settings), name="hotlora", route_prefix="/")
        except Exception as e:  # a replica that cannot start: most often its model load
            raise LoadError(
                f"the replicas did not start ({one_line(str(e))[:300]}); rerun with -v and see "
                "the replica logs"
            ) from e
        log.warning(
            "hotlora: %d replicas on Ray Serve at http://%s:%d",
            settings.replicas or 1,
            settings.host,
            settings.port,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        # a second signal must not cut the cleanup short (it is bounded)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Each step may hang on a cluster that is going down (a SIGTERM to the process group
        # reaches every Ray process too), so each gets a bounded time; then whatever of this
        # run's processes is left is ended. Serve's own stop is for a cluster that stays up
        # (joined), where nothing else removes the application; one this run started goes
        # away whole, Serve's state with it (and Serve's stop of each replica takes seconds).
        # Nothing of Serve's runs unless Ray is up: serve.* would start a cluster of its own.
        if ray.is_initialized():
            if own_cluster:
                log.warning("hotlora: stopping the Ray cluster")
            else:  # a shared cluster: remove this application only, not every Serve app
                log.warning("hotlora: removing the application from Ray Serve")
                _bounded(lambda: serve.delete("hotlora"), 10.0)
            tree.track()  # workers started in the last second, too
            _bounded(ray.shutdown, 3.0)
        tree.reap(grace_s=0.5)
        for signum, handler in zip((signal.SIGTERM, signal.SIGINT), handlers, strict=True):
            if handler is not None:  # None: set outside Python, nothing to put back
                signal.signal(signum, handler)


def _bounded(call: Callable[[], object], timeout_s: float) -> None:
    """`call()` on a daemon thread, waited for `timeout_s` at most; errors are logged."""

    def run() -> None:
        try:
            call()
        except Exception as e:  # noqa: BLE001 - shutting down: report and go on
            log.warning("%s failed while stopping: %r", getattr(call, "__qualname__", call), e)

    name = getattr(call, "__module__", "") + "." + getattr(call, "__qualname__", "")
    start = time.monotonic()
    thread = threading.Thread(target=run, name="hotlora-stop", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("%s did not finish in %g s: going on", name, timeout_s)
    else:
        log.info("%s took %.1f s", name, time.monotonic() - start)
