"""The FastAPI app: built from Settings; the lifespan loads the model and runs the engine loop."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from adapters.adapter import Adapter
from adapters.cache import ByteLRU
from adapters.demo_tasks import demo_adapters
from adapters.store import AdapterStore
from server.config import Settings
from server.engine import Engine, EngineConfig
from server.engine.chat_template import ChatTemplate
from server.engine.loop import EngineLoop, LoopConfig
from server.errors import install_error_handlers
from server.metrics import Metrics
from server.routes import adapters, chat, completions, health, models, tokenize
from server.state import AppState

log = logging.getLogger("hotlora.server")


def build_state(settings: Settings) -> AppState:
    """Load the base model, open the adapter store and start the engine loop."""
    template = ChatTemplate.load(settings.model, settings.chat_template)  # fails fast
    engine = Engine.from_pretrained(
        settings.model,
        EngineConfig(
            max_batch=settings.max_running,
            max_seq_len=settings.max_seq_len,
            max_adapters=settings.max_adapters,
            max_rank=settings.max_rank,
        ),
        device=settings.device,
        dtype=settings.dtype,
    )
    store = AdapterStore(
        settings.store_path, engine.base_shapes, settings.max_rank, settings.max_upload_bytes
    )
    shipped = demo_adapters(settings.model)
    if settings.seed_demo_adapters and shipped and not store.names():
        for name, (path, _) in shipped.items():
            store.put_dir(name, path)
        log.info("adapter store was empty: added the demo adapters %s", ", ".join(shipped))
    metrics = Metrics(max_lora=settings.max_adapters)
    cache: ByteLRU[str, Adapter] = ByteLRU(settings.cpu_cache_bytes)
    loop = EngineLoop(
        engine,
        store,
        cache,
        LoopConfig(
            settings.max_queue,
            settings.merge_hot_adapters,
            settings.merge_min_share,
            settings.merge_min_rows,
        ),
        metrics,
    )
    return AppState(
        settings, engine, store, cache, loop, metrics, int(time.time()), template
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("effective settings: %s", settings.redacted())
        if settings.admin_key is None:
            log.warning(
                "no HOTLORA_ADMIN_KEY: anyone who can reach %s:%d may upload and delete adapters",
                settings.host,
                settings.port,
            )
        if not settings.api_keys:
            log.warning(
                "no HOTLORA_API_KEYS: completions are open to anyone who can reach %s:%d",
                settings.host,
                settings.port,
            )
        state = build_state(settings)
        app.state.hotlora = state
        state.loop.start()
        log.info("serving %s with %d stored adapters", settings.model_id, len(state.store.names()))
        try:
            yield
        finally:
            state.loop.stop()

    app = FastAPI(title="hotlora", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    for module in (completions, chat, models, adapters, tokenize, health):
        app.include_router(module.router)
    return app
