"""The API's handle on the engine core: submits requests, streams their outputs to asyncio.

The core runs in its own process (the default: it gets a core and a GIL of its own) or on a
thread of this one; either way only messages cross. Everything here runs on the event loop
except the reader thread, which only receives message batches and hands each to the loop in
one call. Detokenization and stop strings happen here, off the core's critical path: a stop
string ends a stream at once and aborts its row in the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hotlora.adapters.store import AdapterVersion
from hotlora.server.engine.core import (
    Abort,
    AddRequest,
    Ask,
    Command,
    CoreConfig,
    DropCached,
    EngineCore,
    Message,
    Query,
    Rejected,
    Reply,
    Retire,
    Shutdown,
    ThreadTransport,
    run_core_process,
)
from hotlora.server.engine.errors import ModelLoadError
from hotlora.server.engine.inputs import InputProcessor
from hotlora.server.engine.outputs import StepOutput
from hotlora.server.engine.sampling import SamplingParams
from hotlora.server.engine.tokenizer import Detokenizer
from hotlora.server.metrics import Metrics

log = logging.getLogger(__name__)
_START_TIMEOUT_S = 600.0  # loading a large model from a slow disk


class QueueFull(Exception):
    """Too many requests are waiting; the client should retry later."""


class AdapterGone(Exception):
    """The adapter version a request resolved to was deleted before the request could start."""


class EngineUnavailable(Exception):
    """The engine core is not running (it crashed or the server is stopping)."""


@dataclass
class Stream:
    """One request's results as the asyncio side sees them (outputs carry text)."""

    request_id: str
    arrival: float
    queue: asyncio.Queue[StepOutput | BaseException]
    params: SamplingParams
    detok: Detokenizer
    prompt_len: int
    token_ids: list[int] = field(default_factory=list)
    admitted: float | None = None
    tenant: str | None = None


class EngineClient:
    """Submit, abort, retire and query across the boundary to the engine core."""

    def __init__(
        self,
        inputs: InputProcessor,
        core: CoreConfig,
        *,
        max_queue: int,
        metrics: Metrics,
        own_process: bool = True,
    ) -> None:
        self.inputs, self.core_config = inputs, core
        self.max_queue, self.metrics, self.own_process = max_queue, metrics, own_process
        self.core: EngineCore | None = None  # only with own_process=False (tests reach in)
        self.running = False
        self._streams: dict[str, Stream] = {}
        self._n_waiting = 0  # accepted, no output yet: bounded by max_queue (429 beyond)
        self._waiting_by: dict[str, int] = {}  # the same per tenant (tenants only)
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._reply_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._process: Any = None
        self._commands: Any = None  # the pipe end commands are sent on (own process)
        self._transport: ThreadTransport | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the core and wait until it has loaded the model (its errors are raised)."""
        self._loop = asyncio.get_running_loop()
        if self.own_process:
            await asyncio.to_thread(self._start_process)
        else:
            self._start_thread()
        self.running = True

    def _start_process(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no forked threads
        cmd_recv, cmd_send = ctx.Pipe(duplex=False)
        out_recv, out_send = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=run_core_process,
            args=(self.core_config, cmd_recv, out_send),
            name="hotlora-engine",
            daemon=True,
        )
        self._process.start()
        cmd_recv.close()
        out_send.close()
        self._commands = cmd_send
        if not out_recv.poll(_START_TIMEOUT_S):
            self._process.kill()
            raise ModelLoadError(
                f"the engine process did not load the model in {_START_TIMEOUT_S:.0f} s; check "
                "that the machine has the memory and CPU the model needs"
            )
        try:
            first = out_recv.recv()
        except EOFError as e:
            self._process.join(timeout=10)
            raise ModelLoadError(
                "the engine process exited while loading the model (exit code "
                f"{self._process.exitcode}, -9: killed, often for memory); check that the "
                "machine has the memory the model needs"
            ) from e
        status = first[0].value
        if isinstance(status, BaseException):
            self._process.join(timeout=10)
            raise status
        self._thread = threading.Thread(
            target=self._read, args=(out_recv,), name="hotlora-engine-reader", daemon=True
        )
        self._thread.start()

    def _start_thread(self) -> None:
        self.core = EngineCore.build(self.core_config)
        loop = self._loop
        assert loop is not None
        def deliver(msgs: list[Message]) -> None:
            loop.call_soon_threadsafe(self._on_messages, msgs)

        self._transport = ThreadTransport(deliver)
        core, transport = self.core, self._transport

        def run() -> None:
            try:
                core.run(transport)
            except BaseException:
                log.exception("the engine core stopped")
                loop.call_soon_threadsafe(self._on_core_lost)

        self._thread = threading.Thread(target=run, name="hotlora-engine", daemon=True)
        self._thread.start()

    def _read(self, conn: Any) -> None:
        """The reader thread: one loop callback per message batch (one per engine step)."""
        loop = self._loop
        assert loop is not None
        try:
            while True:
                try:
                    msgs = conn.recv()
                except (EOFError, OSError):
                    break
                loop.call_soon_threadsafe(self._on_messages, msgs)
            loop.call_soon_threadsafe(self._on_core_lost)
        except RuntimeError:  # the event loop closed first: the server is shutting down
            pass

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the core (its requests end) and wait for it."""
        was_running, self.running = self.running, False
        if was_running:
            self._send_quietly(Shutdown())
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def pid(self) -> int | None:
        """The engine process' id (None when the core runs on a thread)."""
        return None if self._process is None else int(self._process.pid)

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        prompt_ids: list[int],
        version: AdapterVersion | None,
        params: SamplingParams,
        request_id: str,
        queue: asyncio.Queue[StepOutput | BaseException] | None = None,
        tenant: str | None = None,
    ) -> Stream:
        """Queue a request (already checked); its outputs go to `queue` (one per request
        unless given: the choices of a streamed request share one, to interleave).
        QueueFull at the queue's bound, or when `tenant` already holds half of the queue (so
        one tenant cannot fill it for all); EngineUnavailable when the core is not running."""
        if not self.running:
            raise EngineUnavailable("the engine is not running")
        if self._n_waiting >= self.max_queue:
            raise QueueFull(f"{self._n_waiting} requests are already waiting")
        if tenant is not None and self._waiting_by.get(tenant, 0) >= max(1, self.max_queue // 2):
            raise QueueFull(
                f"tenant {tenant!r} already has {self._waiting_by[tenant]} requests waiting, "
                "half of the queue"
            )
        stream = Stream(
            request_id,
            time.perf_counter(),
            asyncio.Queue() if queue is None else queue,
            params,
            Detokenizer(self.inputs.tokenizer, params.stop),
            len(prompt_ids),
            tenant=tenant,
        )
        self._streams[request_id] = stream
        self._set_waiting(+1, tenant)
        self._send(AddRequest(request_id, prompt_ids, version, params, tenant))
        return stream

    def abort(self, request_id: str) -> None:
        """Drop a request (its client went away): its row is freed at the core's next step."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        if stream.admitted is None:
            self._set_waiting(-1, stream.tenant)
        self._send_quietly(Abort(request_id))

    async def retire(self, name: str, keep: str | None = None) -> None:
        """Unload every resident version of `name` but `keep`; returns once the core did
        (at once when the core is not running: nothing is resident then)."""
        if not self.running:
            return
        self._send(Retire(name, keep))
        await self._query(Ask.BARRIER)  # commands run in order: this answer follows the retire

    def drop_cached(self, key: str) -> None:
        self._send_quietly(DropCached(key))

    async def resident(self) -> list[str]:
        """The name@version keys in device slots."""
        if not self.running:
            return []
        keys: list[str] = await self._query(Ask.RESIDENT)
        return keys

    async def core_metrics(self) -> bytes:
        """The core's metrics in Prometheus text (empty when it is not running)."""
        if not self.running:
            return b""
        text: bytes = await self._query(Ask.METRICS)
        return text

    async def _query(self, what: Ask) -> Any:
        if not self.running:
            raise EngineUnavailable("the engine is not running")
        reply_id = next(self._reply_ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies[reply_id] = fut
        self._send(Query(reply_id, what))
        return await fut

    def _send(self, cmd: Command) -> None:
        if self._transport is not None:
            self._transport.inbox.put(cmd)
            return
        with self._send_lock:
            self._commands.send(cmd)

    def _send_quietly(self, cmd: Command) -> None:
        """For commands that may race a core that just stopped."""
        with contextlib.suppress(OSError, EOFError, ValueError):
            self._send(cmd)

    def _set_waiting(self, delta: int, tenant: str | None = None) -> None:
        self._n_waiting += delta
        self.metrics.waiting.set(self._n_waiting)
        if tenant is not None:
            left = self._waiting_by.get(tenant, 0) + delta
            if left > 0:
                self._waiting_by[tenant] = left
            else:
                self._waiting_by.pop(tenant, None)

    # ------------------------------------------------------------------ outputs (event loop)

    def _on_messages(self, msgs: list[Message]) -> None:
        now = time.perf_counter()
        for m in msgs:
            if isinstance(m, StepOutput):
                self._on_output(m, now)
            elif isinstance(m, Rejected):
                stream = self._streams.pop(m.request_id, None)
                if stream is not None:
                    if stream.admitted is None:
                        self._set_waiting(-1, stream.tenant)
                    error = AdapterGone(m.message) if m.gone else RuntimeError(m.message)
                    stream.queue.put_nowait(error)
            elif isinstance(m, Reply):
                fut = self._replies.pop(m.reply_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(m.value)

    def _on_output(self, out: StepOutput, now: float) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:  # aborted, or already ended by a stop string
            return
        if stream.admitted is None:
            stream.admitted = now
            self._set_waiting(-1, stream.tenant)
            self.metrics.queue_time.observe(now - stream.arrival)
            self.metrics.prompt_tokens.inc(stream.prompt_len)
        stream.token_ids += out.new_token_ids
        self.metrics.generation_tokens.inc(len(out.new_token_ids))
        p = stream.params
        text = stream.detok.update(
            stream.token_ids,
            final=out.finished,
            check_stop=len(stream.token_ids) > p.min_tokens,
        )
        reason = "stop" if stream.detok.stopped else out.finish_reason
        if reason is not None:
            del self._streams[out.request_id]
            if not out.finished:  # a stop string: the core's row is still running
                self._send_quietly(Abort(out.request_id))
        stream.queue.put_nowait(
            StepOutput(
                out.request_id,
                out.new_token_ids,
                text,
                reason,
                out.logprobs,
                out.prompt_logprobs,
            )
        )

    def _on_core_lost(self) -> None:
        """The core stopped: every waiting stream and query fails (503), /ready turns false."""
        if self.running:
            log.error(
                "the engine core stopped unexpectedly; failing %d requests", len(self._streams)
            )
        self.running = False
        for stream in self._streams.values():
            stream.queue.put_nowait(EngineUnavailable("the engine stopped"))
        self._streams.clear()
        self._set_waiting(-self._n_waiting)
        self._waiting_by.clear()
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(EngineUnavailable("the engine stopped"))
        self._replies.clear()
