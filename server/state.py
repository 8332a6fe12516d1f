"""What the running app holds: built once in the lifespan, reached through server.deps."""

from __future__ import annotations

from dataclasses import dataclass

from adapters.adapter import Adapter
from adapters.cache import ByteLRU
from adapters.store import AdapterStore
from server.config import Settings
from server.engine.engine import Engine
from server.engine.loop import EngineLoop
from server.metrics import Metrics


@dataclass(frozen=True)
class AppState:
    settings: Settings
    engine: Engine
    store: AdapterStore
    cache: ByteLRU[str, Adapter]
    loop: EngineLoop
    metrics: Metrics
    created: int
