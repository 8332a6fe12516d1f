"""The engine core: continuous batching around one Engine, with adapter tiers (disk -> CPU
cache -> device slots), eviction and the hot-adapter merge policy.

It talks to the API only through messages (commands in, outputs out; all picklable), so the
same loop runs on a thread of the API process or in its own process (`run_core_process`), where
it has a core and a GIL of its own. Outputs carry token ids, not text: the API detokenizes.
"""

from __future__ import annotations

import enum
import logging
import multiprocessing.connection as mpc
import queue
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from hotlora.adapters.adapter import Adapter, load_adapter
from hotlora.adapters.cache import ByteLRU
from hotlora.adapters.store import AdapterVersion
from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import Engine
from hotlora.server.engine.fairness import TenantRows
from hotlora.server.engine.outputs import StepOutput
from hotlora.server.engine.sampling import SamplingParams
from hotlora.server.metrics import CoreMetrics

log = logging.getLogger(__name__)
_GAUGE_PERIOD_S = 0.1  # gauges are refreshed at most this often (and before every render)


# ---------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_ids: list[int]
    version: AdapterVersion | None
    params: SamplingParams
    tenant: str | None = None  # admission is fair among tenants (server/engine/fairness.py)


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Retire:
    """Unload every resident version of `name` but `keep` (running requests finish first)."""

    name: str
    keep: str | None = None


@dataclass(frozen=True)
class DropCached:
    key: str


class Ask(enum.Enum):
    """What a Query asks; the Reply's value for each is in the comment."""

    METRICS = "metrics"  # the core's metrics in Prometheus text (bytes)
    RESIDENT = "resident"  # the name@version keys in device slots (list[str])
    BARRIER = "barrier"  # True, once every command sent before it has run


@dataclass(frozen=True)
class Query:
    """Answered with a Reply carrying the value `what` names."""

    reply_id: int
    what: Ask


@dataclass(frozen=True)
class Shutdown:
    pass


Command = AddRequest | Abort | Retire | DropCached | Query | Shutdown


@dataclass(frozen=True)
class Rejected:
    """The request never ran (or stopped): `gone` when its adapter version was deleted."""

    request_id: str
    message: str
    gone: bool = False


@dataclass(frozen=True)
class Reply:
    reply_id: int
    value: object


Message = StepOutput | Rejected | Reply


@dataclass(frozen=True)
class LoopConfig:
    merge_hot_adapters: bool
    merge_min_share: float
    merge_min_rows: int


@dataclass(frozen=True)
class CoreConfig:
    """Everything the core needs to build itself (picklable: sent to the engine process)."""

    model_dir: Path
    engine: EngineConfig
    loop: LoopConfig
    cpu_cache_bytes: int
    torch_threads: int | None = None  # the engine process' intra-op threads (None: torch's)


class Transport(Protocol):
    """The core's side of the channel to the API."""

    def receive(self, timeout: float | None) -> list[Command]: ...

    def send(self, messages: list[Message]) -> None: ...


# ---------------------------------------------------------------------------- the core


@dataclass
class _Load:
    future: Future[Adapter]
    tier: str
    started: float = field(default_factory=time.perf_counter)


class EngineCore:
    """The loop between steps: admit requests (loading their adapters in the background
    first), retire versions, evict idle adapters when slots run out, merge a hot adapter."""

    def __init__(
        self, engine: Engine, cache: ByteLRU[str, Adapter], config: LoopConfig, metrics: CoreMetrics
    ) -> None:
        self.engine, self.cache, self.config, self.metrics = engine, cache, config, metrics
        self._pending: list[AddRequest] = []
        self.rows = TenantRows(engine.config.max_batch)  # requests inside the engine, fairness
        self._loads: dict[str, _Load] = {}
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="hotlora-adapter-load")
        self._out: list[Message] = []
        self._gauges_at = 0.0
        self.stopped = False

    @classmethod
    def build(cls, config: CoreConfig) -> EngineCore:
        engine = Engine.from_pretrained(config.model_dir, config.engine)
        metrics = CoreMetrics(max_lora=config.engine.max_adapters)
        return cls(engine, ByteLRU(config.cpu_cache_bytes), config.loop, metrics)

    def run(self, transport: Transport) -> None:
        """Until Shutdown: take commands, admit, step, send one message batch per step."""
        while not self.stopped:
            # Wait for commands unless there is a step to run; loads are polled every 10 ms.
            busy = self.engine.has_unfinished()
            timeout = 0.0 if busy else (0.01 if self._pending else 0.25)
            for cmd in transport.receive(timeout):
                self.handle(cmd)
            if self.stopped:
                break
            self.tick()
            if self._out:
                out, self._out = self._out, []
                transport.send(out)
        self._loader.shutdown(wait=False, cancel_futures=True)

    def handle(self, cmd: Command) -> None:
        if isinstance(cmd, AddRequest):
            self._pending.append(cmd)
            self.rows.seen(cmd.tenant)
        elif isinstance(cmd, Abort):
            self._abort(cmd.request_id)
        elif isinstance(cmd, Retire):
            self.retire(cmd.name, cmd.keep)
        elif isinstance(cmd, DropCached):
            self.cache.pop(cmd.key)
        elif isinstance(cmd, Query):
            self._out.append(Reply(cmd.reply_id, self._answer(cmd.what)))
        elif isinstance(cmd, Shutdown):
            self.stopped = True
        else:  # a message this core does not know is a bug on the sending side, never ignored
            raise TypeError(f"unknown engine command: {cmd!r}")

    def tick(self) -> None:
        """One iteration between commands: admit, merge policy, one step, gauges."""
        try:
            self._admit()
            self._merge_policy()
            if self.engine.has_unfinished():
                self._step()
        except Exception:  # never let one bad step kill the loop: fail what is in flight
            log.exception("engine step failed")
            self._fail_all("internal error in the engine step")
        now = time.perf_counter()
        if now - self._gauges_at >= _GAUGE_PERIOD_S:
            self._gauges_at = now
            self._update_gauges()

    def _answer(self, what: Ask) -> object:
        if what is Ask.METRICS:
            self._update_gauges()
            return self.metrics.render()
        if what is Ask.RESIDENT:
            return self.engine.adapters
        if what is Ask.BARRIER:
            return True
        raise TypeError(f"unknown engine query: {what!r}")

    def retire(self, name: str, keep: str | None = None) -> None:
        for key in list(self.engine.adapters):
            if key.split("@", 1)[0] == name and key != keep:
                self.engine.remove_adapter(key)

    def _abort(self, request_id: str) -> None:
        for p in self._pending:
            if p.request_id == request_id:
                self._pending.remove(p)
                return
        if self.engine.abort_request(request_id):
            self.rows.leave(request_id)

    def _admit(self) -> None:
        """Move pending requests into the engine as rows free up, fairly among tenants; an
        adapter not resident is loaded in the background first (the loads of every queued
        request's adapter overlap the steps)."""
        still: set[str] = set()
        failed: dict[str, Rejected] = {}
        rows = self.engine.kv.free_rows - self.engine.num_waiting
        share = self.rows.share()
        for p in self.rows.order(self._pending):
            version = p.version
            if rows <= 0 or not self.rows.may_take(p.tenant, rows, share):
                # It waits for a row; its adapter is read meanwhile, but takes no slot: a
                # resident adapter of a request that cannot run would only be evicted.
                if version is not None and version.key not in self.engine.residents:
                    self._start_load(version)
                still.add(p.request_id)
                continue
            if version is not None and version.key not in self.engine.residents:
                status = failed.get(version.key) or self._make_resident(version)
                if isinstance(status, Rejected):
                    failed[version.key] = status
                    self._out.append(replace(status, request_id=p.request_id))
                    continue
                if not status:
                    still.add(p.request_id)
                    continue
            key = None if version is None else version.key
            try:
                self.engine.add_request(p.prompt_ids, key, p.params, request_id=p.request_id)
            except Exception as e:
                self._out.append(Rejected(p.request_id, str(e)))
                continue
            rows -= 1
            self.rows.enter(p.request_id, p.tenant)
        self._pending = [p for p in self._pending if p.request_id in still]

    def _start_load(self, version: AdapterVersion) -> _Load:
        """The version's load into memory (from the CPU cache or disk), started if need be."""
        key = version.key
        load = self._loads.get(key)
        if load is None:
            cached = self.cache.get(key)
            if cached is not None:
                fut: Future[Adapter] = Future()
                fut.set_result(cached)
                load = _Load(fut, "cpu")
            else:
                base, rank = self.engine.base_shapes, self.engine.config.max_rank
                future = self._loader.submit(
                    load_adapter, version.path, name=key, base=base, max_rank=rank
                )
                load = _Load(future, "disk")
            self._loads[key] = load
        return load

    def _make_resident(self, version: AdapterVersion) -> bool | Rejected:
        """True once the version sits in a slot, False while loading or waiting for a free
        slot, or why it cannot be (the version was deleted, a bad file)."""
        key = version.key
        load = self._start_load(version)
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
            if not version.path.exists():  # the API deleted it after resolving the request
                return Rejected("", f"adapter {version.name!r} was deleted", gone=True)
            log.warning("loading %s failed: %s", key, e)
            return Rejected("", f"loading adapter {version.name!r} failed: {e}")
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
        for out in outs:
            if out.finished:
                self.rows.leave(out.request_id)
        self._out.extend(outs)

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

    def _fail_all(self, message: str) -> None:
        for rid in list(self.rows.live):
            self.engine.abort_request(rid)
            self._out.append(Rejected(rid, message))
            self.rows.leave(rid)

    def _update_gauges(self) -> None:
        m, e = self.metrics, self.engine
        m.running.set(e.num_running)
        m.kv_usage.set(1.0 - e.kv.free_rows / e.kv.max_rows)
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


# ---------------------------------------------------------------------------- transports


class ThreadTransport:
    """The core on a thread of the API process: a queue in, a callback out."""

    def __init__(self, deliver: Callable[[list[Message]], None]) -> None:
        self.inbox: queue.Queue[Command] = queue.Queue()
        self.deliver = deliver

    def receive(self, timeout: float | None) -> list[Command]:
        try:
            first = self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
        except queue.Empty:
            return []
        cmds = [first]
        while True:
            try:
                cmds.append(self.inbox.get_nowait())
            except queue.Empty:
                return cmds

    def send(self, messages: list[Message]) -> None:
        self.deliver(messages)


class PipeTransport:
    """The core in its own process: one pipe in (commands), one pipe out (message batches)."""

    def __init__(self, commands: mpc.Connection, outputs: mpc.Connection) -> None:
        self.commands, self.outputs = commands, outputs

    def receive(self, timeout: float | None) -> list[Command]:
        cmds: list[Command] = []
        if self.commands.poll(timeout):
            cmds.append(self.commands.recv())
            while self.commands.poll():
                cmds.append(self.commands.recv())
        return cmds

    def send(self, messages: list[Message]) -> None:
        self.outputs.send(messages)


def run_core_process(config: CoreConfig, commands: mpc.Connection, outputs: mpc.Connection) -> None:
    """The engine process' entry point: build the core, say ready (or why not), run it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The API process decides when the engine stops (Shutdown, or its end closing the pipe):
    # a SIGTERM or Ctrl-C sent to the whole process group must not cut a graceful drain short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if config.torch_threads is not None:
        import torch

        torch.set_num_threads(config.torch_threads)
    transport = PipeTransport(commands, outputs)
    try:
        core = EngineCore.build(config)
    except Exception as e:  # ModelLoadError and the like: the API reports it and exits
        outputs.send([Reply(0, e)])
        return
    outputs.send([Reply(0, True)])
    try:
        core.run(transport)
    except (EOFError, OSError):  # the API process went away: nothing left to serve
        log.warning("engine process: the API process closed the channel; stopping")
