"""The FastAPI app: built from Settings; the lifespan starts the engine core and stops it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from hotlora.adapters.demo_tasks import demo_adapters
from hotlora.adapters.store import AdapterStore
from hotlora.server.access_log import install_request_middleware
from hotlora.server.config import Settings
from hotlora.server.engine import EngineConfig
from hotlora.server.engine.chat_template import ChatTemplate
from hotlora.server.engine.client import EngineClient
from hotlora.server.engine.core import CoreConfig, LoopConfig
from hotlora.server.engine.inputs import InputProcessor
from hotlora.server.errors import install_error_handlers
from hotlora.server.metrics import Metrics
from hotlora.server.openapi import install_openapi
from hotlora.server.routes import adapters, chat, completions, health, models, tokenize
from hotlora.server.state import AppState
from hotlora.server.tenants import WATCH_INTERVAL_S, TenantRegistry

log = logging.getLogger("hotlora.server")


def build_state(settings: Settings) -> AppState:
    """Read the model's config and tokenizer, open the adapter store; the engine core (which
    loads the weights) starts in the lifespan."""
    tenants = TenantRegistry(settings.tenants_file)  # fails fast on an invalid file
    template = ChatTemplate.load(settings.model, settings.chat_template)  # fails fast
    engine_config = EngineConfig(
        max_batch=settings.max_running,
        max_seq_len=settings.max_seq_len,
        max_adapters=settings.max_adapters,
        max_rank=settings.max_rank,
        device=settings.device,
        dtype=settings.dtype,
        detokenize=False,  # the API detokenizes (EngineClient)
        cuda_graphs=settings.cuda_graphs,
    )
    inputs = InputProcessor.from_model_dir(settings.model, engine_config)
    store = AdapterStore(
        settings.store_path,
        inputs.base_shapes,
        settings.max_rank,
        settings.max_upload_bytes,
        shared=settings.shared_store,
    )
    shipped = demo_adapters(settings.model)
    if settings.seed_demo_adapters and shipped and not store.names():
        for name, (path, _) in shipped.items():
            store.put_dir(name, path)
        log.info("adapter store was empty: added the demo adapters %s", ", ".join(shipped))
    metrics = Metrics()
    core = CoreConfig(
        model_dir=settings.model,
        engine=engine_config,
        loop=LoopConfig(
            settings.merge_hot_adapters, settings.merge_min_share, settings.merge_min_rows
        ),
        cpu_cache_bytes=settings.cpu_cache_bytes,
        torch_threads=settings.torch_threads,
    )
    client = EngineClient(
        inputs,
        core,
        max_queue=settings.max_queue,
        metrics=metrics,
        own_process=settings.engine_process,
    )
    return AppState(
        settings, inputs, store, client, metrics, int(time.time()), template, tenants=tenants
    )


def _watch_tenants(tenants: TenantRegistry) -> asyncio.Task[None] | None:
    """Reload the tenants file on SIGHUP and whenever it changes (polled: no inotify needed)."""
    if not tenants.enabled:
        return None
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
        # Only the main thread may set signal handlers (a test's app runs elsewhere).
        loop.add_signal_handler(signal.SIGHUP, tenants.reload)

    async def poll() -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            await asyncio.to_thread(tenants.reload_if_changed)

    return asyncio.create_task(poll())


def _refresh_store(state: AppState) -> asyncio.Task[None] | None:
    """With a store other servers write too (shared_store), listings catch up with their
    uploads and deletes every shared_store_refresh_s; requests see them at once (resolve reads
    the name's directory)."""
    settings = state.settings
    if not settings.shared_store:
        return None

    async def refresh() -> None:
        while True:
            await asyncio.sleep(settings.shared_store_refresh_s)
            try:
                await asyncio.to_thread(state.store.refresh)
            except OSError as e:
                log.warning("adapter store refresh failed: %s", e)

    return asyncio.create_task(refresh())


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("effective settings: %s", settings.redacted())
        if settings.tenants_file is not None:
            log.info("tenants from %s: every request needs a key", settings.tenants_file)
        elif settings.admin_key is None:
            log.warning(
                "no HOTLORA_ADMIN_KEY: anyone who can reach %s:%d may upload and delete adapters",
                settings.host,
                settings.port,
            )
        if not settings.api_keys and settings.tenants_file is None:
            log.warning(
                "no HOTLORA_API_KEYS: completions are open to anyone who can reach %s:%d",
                settings.host,
                settings.port,
            )
        state = build_state(settings)
        app.state.hotlora = state
        await state.client.start()
        log.info("serving %s with %d stored adapters", settings.model_id, state.store.count())
        tasks = [t for t in (_watch_tenants(state.tenants), _refresh_store(state)) if t]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.to_thread(state.client.stop)

    app = FastAPI(title="hotlora", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    install_request_middleware(app, settings)  # access log, request ids, drain, body limit
    for module in (completions, chat, models, adapters, tokenize, health):
        app.include_router(module.router)
    install_openapi(app)  # the contract: every status each operation answers
    return app
