"""The engine loop: runs `Engine.step` on its own thread, streams results to asyncio.

Only this thread touches the Engine. The asyncio side hands it commands through an inbox;
tokens come back through per-request asyncio queues. Between steps the loop admits pending
requests (loading their adapters in the background first), retires adapter versions,
evicts idle ones when slots run out, and decides whether to serve a hot adapter merged.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from adapters.adapter import Adapter
from adapters.cache import ByteLRU
from adapters.store import AdapterStore, AdapterVersion
from server.engine.engine import Engine
from server.engine.outputs import StepOutput
from server.engine.sampling import SamplingParams
from server.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFull(Exception):
    """Too many requests are waiting; the client should retry later."""


class AdapterGone(Exception):
    """The adapter version a request resolved to was deleted before the request could start."""


@dataclass(frozen=True)
class LoopConfig:
    max_queue: int
    merge_hot_adapters: bool
    merge_min_share: float
    merge_min_rows: int


@dataclass
class Stream:
    """One request's results as the asyncio side sees them."""

    request_id: str
    arrival: float
    queue: asyncio.Queue[StepOutput | BaseException]
    loop: asyncio.AbstractEventLoop
    admitted: float | None = None

    def put(self, item: StepOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _deliver(items: list[tuple[Stream, StepOutput]]) -> None:
    """On the event loop: hand one step's outputs to their streams."""
    for stream, out in items:
        stream.queue.put_nowait(out)


@dataclass
class _Pending:
    stream: Stream
    prompt_ids: list[int]
    version: AdapterVersion | None
    params: SamplingParams


@dataclass
class _Load:
    future: Future[Adapter]
    tier: str
    started: float = field(default_factory=time.perf_counter)


class EngineLoop:
    """Continuous batching around one Engine, with adapter tiers: disk -> CPU cache -> slots."""

    def __init__(
        self,
        engine: Engine,
        store: AdapterStore,
        cache: ByteLRU[str, Adapter],
        config: LoopConfig,
        metrics: Metrics,
    ) -> None:
        self.engine, self.store, self.cache = engine, store, cache
        self.config, self.metrics = config, metrics
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._pending: list[_Pending] = []
        self._streams: dict[str, Stream] = {}
        self._loads: dict[str, _Load] = {}
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="hotlora-adapter-load")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # Requests accepted but not yet given a row: bounded by max_queue (429 beyond). Both
        # threads change it, so it has its own lock.
        self._n_waiting = 0
        self._waiting_lock = threading.Lock()
        self.running = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hotlora-engine", daemon=True)
        self.running = True
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(lambda: None)
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._loader.shutdown(wait=False, cancel_futures=True)
        self.running = False

    # ------------------------------------------------------------------ asyncio side

    def submit(
        self,
        prompt_ids: list[int],
        version: AdapterVersion | None,
        params: SamplingParams,
        request_id: str,
    ) -> Stream:
        """Queue a request (already checked); raises QueueFull when the queue is at its bound."""
        with self._waiting_lock:
            if self._n_waiting >= self.config.max_queue:
                raise QueueFull(f"{self._n_waiting} requests are already waiting")
            self._n_waiting += 1
        stream = Stream(
            request_id, time.perf_counter(), asyncio.Queue(), asyncio.get_running_loop()
        )
        pending = _Pending(stream, prompt_ids, version, params)
        self._inbox.put(lambda: self._pending.append(pending))
        return stream

    def abort(self, request_id: str) -> None:
        """Free a request's row at the next step (its client went away)."""
        self._inbox.put(lambda: self._abort(request_id))

    async def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the engine thread between steps and await its result."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        loop = fut.get_loop()

        def run() -> None:
            try:
                result = fn()
            except BaseException as e:  # handed to the awaiting coroutine
                loop.call_soon_threadsafe(_set_exception, fut, e)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

        self._inbox.put(run)
        return await fut

    def retire(self, name: str, keep: str | None = None) -> None:
        """Unload every resident version of `name` but `keep`; running requests finish first."""
        for key in list(self.engine.adapters):
            if key.split("@", 1)[0] == name and key != keep:
                self.engine.remove_adapter(key)

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        while not self._stop.is_set():
            # Wait for commands unless there is a step to run; loads are polled every 10 ms.
            timeout = None if self.engine.has_unfinished() else (0.01 if self._pending else 0.25)
            self._drain_inbox(timeout)
            try:
                self._admit()
                self._merge_policy()
                if self.engine.has_unfinished():
                    self._step()
            except Exception:  # never let one bad step kill the loop: fail what is in flight
                log.exception("engine step failed")
                self._fail_all(RuntimeError("internal error in the engine step"))
            self._update_gauges()

    def _drain_inbox(self, timeout: float | None) -> None:
        try:
            cmd = self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            cmd()
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _left_queue(self) -> None:
        with self._waiting_lock:
            self._n_waiting -= 1

    def _abort(self, request_id: str) -> None:
        for p in self._pending:
            if p.stream.request_id == request_id:
                self._pending.remove(p)
                self._left_queue()
                return
        if self.engine.abort_request(request_id):
            stream = self._streams.pop(request_id, None)
            if stream is not None and stream.admitted is None:
                self._left_queue()

    def _admit(self) -> None:
        """Move pending requests into the engine, loading adapters first (in the background)."""
        still: list[_Pending] = []
        failed: dict[str, Exception] = {}
        for p in self._pending:
            key = None if p.version is None else p.version.key
            if p.version is not None and key not in self.engine.adapters:
                status = failed.get(p.version.key) or self._make_resident(p.version)
                if isinstance(status, Exception):
                    failed[p.version.key] = status
                    self._reject(p, status)
                    continue
                if not status:
                    still.append(p)
                    continue
            try:
                self.engine.add_request(p.prompt_ids, key, p.params, request_id=p.stream.request_id)
            except Exception as e:
                self._reject(p, e)
                continue
            self._streams[p.stream.request_id] = p.stream
            self.metrics.prompt_tokens.inc(len(p.prompt_ids))
        self._pending = still

    def _reject(self, p: _Pending, error: Exception) -> None:
        self._left_queue()
        p.stream.put(error)

    def _make_resident(self, version: AdapterVersion) -> bool | Exception:
        """True once the version sits in a slot, False while loading or waiting for a free
        slot, or the error that makes it impossible (the version was deleted, a bad file)."""
        key = version.key
        load = self._loads.get(key)
        if load is None:
            cached = self.cache.get(key)
            if cached is not None:
                fut: Future[Adapter] = Future()
                fut.set_result(cached)
                load = _Load(fut, "cpu")
            else:
                load = _Load(self._loader.submit(self.store.load, version), "disk")
            self._loads[key] = load
        if not load.future.done():
            return False
        if load.future.exception() is None and self.engine.free_slots == 0:
            idle = self.engine.idle_adapters()
            if not idle:
                return False  # every slot serves a running request: wait for one to finish
            self.engine.remove_adapter(idle[0])
            self.metrics.evictions.labels("device").inc()
        del self._loads[key]
        try:
            adapter = load.future.result()
            self.engine.load_adapter(key, adapter)
        except Exception as e:
            self.metrics.adapter_loads.labels(load.tier, "error", version.kind).inc()
            if self.store.get(version.name, version.version) is None:
                return AdapterGone(f"adapter {version.name!r} was deleted")
            log.warning("loading %s failed: %s", key, e)
            return e
        for evicted in self.cache.put(key, adapter, adapter.size_bytes):
            if evicted != key:
                self.metrics.evictions.labels("cpu").inc()
        self.metrics.adapter_loads.labels(load.tier, "ok", adapter.kind).inc()
        self.metrics.adapter_load_time.labels(load.tier).observe(time.perf_counter() - load.started)
        return True

    def _step(self) -> None:
        prefill = self.engine.num_waiting > 0 and self.engine.kv.free_rows > 0
        outs = self.engine.step()
        self.metrics.batch_size.labels("prefill" if prefill else "decode").observe(len(outs))
        now = time.perf_counter()
        ready: list[tuple[Stream, StepOutput]] = []
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if stream.admitted is None:
                stream.admitted = now
                self._left_queue()
                self.metrics.queue_time.observe(now - stream.arrival)
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
            if out.finished:
                del self._streams[out.request_id]
            ready.append((stream, out))
        if ready:  # one cross-thread wake-up per step, not one per row
            ready[0][0].loop.call_soon_threadsafe(_deliver, ready)

    def _merge_policy(self) -> None:
        """Merge the adapter holding >= merge_min_share of the running rows; unmerge below half."""
        engine, cfg = self.engine, self.config
        merged = engine.merged_adapter
        if not cfg.merge_hot_adapters:
            if merged is not None:
                engine.unmerge_adapter()
            return
        running, _ = engine.adapter_counts()
        # Retired versions still serve their last requests but cannot be merged, and a DEU
        # part is not linear: only adapters with a LoRA part can be merged.
        kinds = engine.adapter_kinds()
        running = {k: n for k, n in running.items() if kinds.get(k, "deu") != "deu"}
        total = engine.num_running
        if merged is not None and (
            total == 0 or running.get(merged, 0) < 0.5 * cfg.merge_min_share * total
        ):
            engine.unmerge_adapter()
            merged = None
        if merged is None and total >= cfg.merge_min_rows and running:
            top, rows = max(running.items(), key=lambda kv: kv[1])
            if rows >= cfg.merge_min_share * total:
                engine.merge_adapter(top)
                self.metrics.merges.inc()
                log.info("merged hot adapter %s (%d of %d running rows)", top, rows, total)

    def _fail_all(self, error: Exception) -> None:
        for rid, stream in list(self._streams.items()):
            self.engine.abort_request(rid)
            stream.put(error)
        self._streams.clear()
        with self._waiting_lock:
            self._n_waiting = len(self._pending)

    def _update_gauges(self) -> None:
        m, e = self.metrics, self.engine
        m.running.set(e.num_running)
        m.waiting.set(self._n_waiting)
        m.slots_used.set(e.config.max_adapters - e.free_slots)
        m.set_resident(e.adapter_kinds().values())
        m.merged.set(0 if e.merged_adapter is None else 1)
        m.cache_bytes.set(self.cache.bytes_used)
        running, waiting = e.adapter_counts()
        pending = [p.version.name for p in self._pending if p.version is not None]
        # Routers match these against the `model` clients send: names, not name@version keys.
        m.set_lora_info(
            sorted({k.split("@", 1)[0] for k in running}),
            sorted({k.split("@", 1)[0] for k in waiting} | set(pending)),
        )


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], error: BaseException) -> None:
    if not fut.done():
        fut.set_exception(error)
