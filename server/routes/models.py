"""GET /v1/models: the base model first, then every adapter (by name) with parent = the base's
id; paged with OpenAI's `limit` + `after` (server/routes/listing.py)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from server.deps import ApiKeyDep, StateDep
from server.routes.listing import After, Limit, full_listings, json_response, quote, render
from server.schemas import ModelList
from server.state import AppState

router = APIRouter()


def _card(id_: str, created: int, root: str, parent: str) -> str:
    """A ModelCard as JSON text (its fields, in its order); root and parent already quoted."""
    return (
        f'{{"id":{quote(id_)},"object":"model","created":{int(created)},"owned_by":"hotlora",'
        f'"root":{root},"parent":{parent}}}'
    )


def _page(state: AppState, after: str | None, limit: int | None) -> bytes:
    base = state.settings.model_id
    qbase = quote(base)
    # The base is the first item: a page from the start holds it; after it come the adapters.
    with_base = after is None
    adapters_after = None if after is None or after == base else after
    n = None if limit is None else limit - with_base
    versions, more = state.store.page(adapters_after, n)
    cards = [_card(base, state.created, qbase, "null")] if with_base else []
    cards += [_card(v.name, v.created, qbase, qbase) for v in versions]
    first = base if with_base else (versions[0].name if versions else None)
    last = versions[-1].name if versions else (base if with_base else None)
    return render(cards, first, last, more)


@router.get("/v1/models", dependencies=[ApiKeyDep], response_model=ModelList)
async def list_models(state: StateDep, limit: Limit = None, after: After = None) -> Response:
    if limit is None and after is None:
        key = ("models", state.settings.model_id, state.created)
        return json_response(full_listings.get(state.store, key, lambda: _page(state, None, None)))
    return json_response(_page(state, after, limit))
