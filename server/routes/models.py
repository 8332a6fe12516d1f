"""GET /v1/models: the base model first, then every adapter with parent = the base's id."""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import ApiKeyDep, StateDep
from server.schemas import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models", dependencies=[ApiKeyDep], response_model=ModelList)
async def list_models(state: StateDep) -> ModelList:
    base = state.settings.model_id
    cards = [ModelCard(id=base, created=state.created, root=base)]
    cards += [
        ModelCard(id=v.name, created=v.created, root=base, parent=base)
        for v in state.store.latest_all()
    ]
    return ModelList(data=cards)
