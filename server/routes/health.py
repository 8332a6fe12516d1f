"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from hotlora.server.deps import StateDep
from hotlora.server.errors import APIError
from hotlora.server.lifecycle import lifecycle_of

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request, state: StateDep) -> dict[str, str]:
    if lifecycle_of(request.app).draining:  # SIGTERM: leave the load balancer, keep serving
        raise APIError(503, "the server is shutting down", headers={"Retry-After": "1"})
    if not state.client.running:
        raise APIError(503, "the engine is not running")
    return {"status": "ready", "model": state.settings.model_id}


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    text = state.metrics.render() + await state.client.core_metrics()
    return Response(text, media_type=CONTENT_TYPE_LATEST)
