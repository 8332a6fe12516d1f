"""GET /v1/models: the base model first, then every adapter (by name) with parent = the base's
id; paged with OpenAI's `limit` + `after` (server/routes/listing.py)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from hotlora.server.deps import PrincipalDep, StateDep
from hotlora.server.namespaces import namespaces, shown_name
from hotlora.server.routes.adapters import visible_page
from hotlora.server.routes.listing import After, Limit, full_listings, json_response, quote, render
from hotlora.server.schemas import ModelList
from hotlora.server.state import AppState
from hotlora.server.tenants import Principal

router = APIRouter()


def _card(id_: str, created: int, root: str, parent: str) -> str:
    """A ModelCard as JSON text (its fields, in its order); root and parent already quoted."""
    return (
        f'{{"id":{quote(id_)},"object":"model","created":{int(created)},"owned_by":"hotlora",'
        f'"root":{root},"parent":{parent}}}'
    )


def _page(state: AppState, p: Principal, after: str | None, limit: int | None) -> bytes:
    base = state.settings.model_id
    qbase = quote(base)
    # The base is the first item: a page from the start holds it; after it come the adapters.
    with_base = after is None
    adapters_after = None if after is None or after == base else after
    n = None if limit is None else limit - with_base
    versions, more = visible_page(state, p, adapters_after, n)
    names = [shown_name(p, v) for v in versions]
    cards = [_card(base, state.created, qbase, "null")] if with_base else []
    cards += [_card(name, v.created, qbase, qbase) for name, v in zip(names, versions, strict=True)]
    first = base if with_base else (names[0] if names else None)
    last = names[-1] if names else (base if with_base else None)
    return render(cards, first, last, more)


@router.get("/v1/models", response_model=ModelList)
async def list_models(
    state: StateDep, principal: PrincipalDep, limit: Limit = None, after: After = None
) -> Response:
    """The base model and every adapter the caller sees."""
    if limit is None and after is None:
        key = ("models", state.settings.model_id, state.created, namespaces(principal),
               principal.role)
        body = full_listings.get(state.store, key, lambda: _page(state, principal, None, None))
        return json_response(body)
    return json_response(_page(state, principal, after, limit))
