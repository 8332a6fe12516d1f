"""What the running app holds: built once in the lifespan, reached through server.deps."""

from __future__ import annotations

from dataclasses import dataclass, field

from hotlora.adapters.store import AdapterStore, AdapterVersion
from hotlora.server.config import Settings
from hotlora.server.engine.chat_template import ChatTemplate
from hotlora.server.engine.client import EngineClient
from hotlora.server.engine.inputs import InputProcessor
from hotlora.server.errors import APIError
from hotlora.server.metrics import Metrics
from hotlora.server.namespaces import resolve
from hotlora.server.rate_limit import RateLimiter
from hotlora.server.tenants import Principal, TenantRegistry


@dataclass(frozen=True)
class AppState:
    settings: Settings
    inputs: InputProcessor  # tokenizer and request checks (no weights in the API process)
    store: AdapterStore
    client: EngineClient  # the engine core, in its own process or on a thread
    metrics: Metrics
    created: int
    chat_template: ChatTemplate | None = None
    tenants: TenantRegistry = field(default_factory=lambda: TenantRegistry(None))
    limiter: RateLimiter = field(default_factory=RateLimiter)

    def resolve_model(self, model: str, principal: Principal) -> AdapterVersion | None:
        """A request's `model`: None for the base model's id, else the newest version of the
        adapter the principal calls that; 404 for anything else (another tenant's adapter
        included: the answer is the same as for a missing one)."""
        if model == self.settings.model_id:
            return None
        version = resolve(self.store, principal, model)
        if version is None:
            raise APIError(
                404, f"model {model!r} does not exist; GET /v1/models lists them", "model"
            )
        return version
