"""The FastAPI app: built from Settings; the lifespan starts the engine core and stops it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from adapters.demo_tasks import demo_adapters
from adapters.store import AdapterStore
from server.config import Settings
from server.engine import EngineConfig
from server.engine.chat_template import ChatTemplate
from server.engine.client import EngineClient
from server.engine.core import CoreConfig, LoopConfig
from server.engine.inputs import InputProcessor
from server.errors import install_error_handlers
from server.metrics import Metrics
from server.routes import adapters, chat, completions, health, models, tokenize
from server.state import AppState

log = logging.getLogger("hotlora.server")


def build_state(settings: Settings) -> AppState:
    """Read the model's config and tokenizer, open the adapter store; the engine core (which
    loads the weights) starts in the lifespan."""
    template = ChatTemplate.load(settings.model, settings.chat_template)  # fails fast
    engine_config = EngineConfig(
        max_batch=settings.max_running,
        max_seq_len=settings.max_seq_len,
        max_adapters=settings.max_adapters,
        max_rank=settings.max_rank,
        device=settings.device,
        dtype=settings.dtype,
        detokenize=False,  # the API detokenizes (EngineClient)
    )
    inputs = InputProcessor.from_model_dir(settings.model, engine_config)
    store = AdapterStore(
        settings.store_path, inputs.base_shapes, settings.max_rank, settings.max_upload_bytes
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
    return AppState(settings, inputs, store, client, metrics, int(time.time()), template)


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
        await state.client.start()
        log.info("serving %s with %d stored adapters", settings.model_id, len(state.store.names()))
        try:
            yield
        finally:
            await asyncio.to_thread(state.client.stop)

    app = FastAPI(title="hotlora", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    for module in (completions, chat, models, adapters, tokenize, health):
        app.include_router(module.router)
    return app
