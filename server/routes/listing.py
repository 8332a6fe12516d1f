"""Paged, cached listings of a large adapter store (GET /v1/models, GET /v1/adapters).

OpenAI's cursor pagination: ``limit`` (page size) and ``after`` (the id of the previous page's
last item); the body carries ``first_id``, ``last_id`` and ``has_more`` beside ``object`` and
``data``. Without ``limit`` everything is listed, as before, so clients that know nothing of
pages keep working. Items are in one stable order (by id; the base model first in
/v1/models), and ``after`` is a position in that order, not a lookup: a cursor stays valid when
its item is deleted, and every item present for the whole walk is listed exactly once.

Bodies are rendered straight to JSON text (no per-item pydantic models or dicts), and a full
listing is rendered once per store generation (10,000 adapters: ~6 ms, then a dictionary hit).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Annotated

from fastapi import Query
from fastapi.responses import Response

from hotlora.adapters.store import AdapterStore

MAX_LIMIT = 10_000

Limit = Annotated[
    int | None,
    Query(ge=1, le=MAX_LIMIT, description="page size (default: every item, in one page)"),
]
After = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=256,
        description="the id of the previous page's last item: this page starts after it",
    ),
]


_PLAIN = re.compile(r"[A-Za-z0-9._@-]*")  # nothing JSON would escape (every adapter name)


def quote(s: str) -> str:
    """A JSON string literal, without json.dumps for the (common) plain ones."""
    return f'"{s}"' if _PLAIN.fullmatch(s) else json.dumps(s, ensure_ascii=False)


def render(items: Sequence[str], first_id: str | None, last_id: str | None,
           has_more: bool) -> bytes:
    """A list body as compact JSON bytes from already rendered items (JSON object texts)."""
    first = "null" if first_id is None else quote(first_id)
    last = "null" if last_id is None else quote(last_id)
    more = "true" if has_more else "false"
    return (
        f'{{"object":"list","data":[{",".join(items)}],"first_id":{first},'
        f'"last_id":{last},"has_more":{more}}}'
    ).encode()


def json_response(body: bytes) -> Response:
    return Response(content=body, media_type="application/json")


class _Cache:
    """One rendered full listing per (store, listing kind), valid while the store's generation
    has not changed. Keyed weakly by the store, so a closed app's store is not kept alive."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: weakref.WeakKeyDictionary[
            AdapterStore, dict[Hashable, tuple[int, bytes]]
        ] = weakref.WeakKeyDictionary()

    def get(self, store: AdapterStore, key: Hashable, build: Callable[[], bytes]) -> bytes:
        # The generation is read before building: a change while building makes the entry
        # stale (rebuilt next time), never a stale body filed under a newer generation.
        generation = store.generation
        with self._lock:
            hit = self._items.get(store, {}).get(key)
        if hit is not None and hit[0] == generation:
            return hit[1]
        body = build()
        with self._lock:
            self._items.setdefault(store, {})[key] = (generation, body)
        return body


full_listings = _Cache()
