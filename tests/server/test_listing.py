"""GET /v1/models and GET /v1/adapters paged with OpenAI's `limit` + `after`: one stable order,
every item exactly once across pages, the same items as the unpaged listing (which clients
that ignore pages still get), bad parameters answered 400 naming them, and listings that
follow uploads and deletes at once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hotlora.adapters.demo_tasks import DEMO_ADAPTERS, DEMO_MODEL
from hotlora.adapters.format import BaseShapes
from hotlora.adapters.store import AdapterStore
from hotlora.server.schemas import AdapterList, ModelList
from tests.server.support import DEMO, assert_error, demo_files, make_settings, serve, upload

NAMES = sorted(f"p{i:02d}" for i in range(23)) + ["A-upper", "zz"]  # "A" sorts before "p"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("listing")
    cfg = json.loads((DEMO_MODEL / "config.json").read_text())
    base = BaseShapes.gpt2(cfg["n_layer"], cfg["n_embd"], cfg.get("n_inner"))
    store = AdapterStore(root / "store", base, max_rank=64)
    for name in NAMES:
        store.put_dir(name, DEMO_ADAPTERS / "sort")
    with serve(make_settings(root)) as c:
        yield c


def walk(client: TestClient, path: str, limit: int) -> tuple[list[str], int]:
    """Every id of a paged walk and the number of pages."""
    ids: list[str] = []
    after, pages = None, 0
    while True:
        params: dict[str, Any] = {"limit": limit} | ({"after": after} if after else {})
        r = client.get(path, params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        pages += 1
        key = "id" if path == "/v1/models" else "name"
        page = [item[key] for item in body["data"]]
        assert len(page) <= limit
        assert body["object"] == "list"
        ends = (page[0], page[-1]) if page else (None, None)
        assert (body["first_id"], body["last_id"]) == ends
        ids += page
        if not body["has_more"]:
            return ids, pages
        assert page, "has_more with an empty page would never end"
        after = body["last_id"]


def test_models_unpaged_lists_everything_base_first_then_by_name(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    ModelList.model_validate(body)
    assert [m["id"] for m in body["data"]] == [DEMO, *sorted(NAMES)]
    assert body["has_more"] is False
    assert (body["first_id"], body["last_id"]) == (DEMO, max(NAMES))
    base, first = body["data"][0], body["data"][1]
    assert base["parent"] is None and base["root"] == DEMO and base["object"] == "model"
    assert first["parent"] == DEMO and first["root"] == DEMO and first["owned_by"] == "hotlora"


@pytest.mark.parametrize("limit", [1, 2, 7, 26, 1000])
def test_model_pages_list_every_model_once_in_the_unpaged_order(
    client: TestClient, limit: int
) -> None:
    everything = [m["id"] for m in client.get("/v1/models").json()["data"]]
    ids, pages = walk(client, "/v1/models", limit)
    assert ids == everything
    assert pages == max(1, -(-len(everything) // limit))


@pytest.mark.parametrize("limit", [1, 4, 25, 10_000])
def test_adapter_pages_list_every_adapter_once_by_name(client: TestClient, limit: int) -> None:
    body = client.get("/v1/adapters").json()
    AdapterList.model_validate(body)
    assert [a["name"] for a in body["data"]] == sorted(NAMES)
    assert walk(client, "/v1/adapters", limit)[0] == sorted(NAMES)


def test_after_is_a_position(client: TestClient) -> None:
    def ids(path: str, **params: Any) -> list[str]:
        return [x.get("id", x.get("name")) for x in client.get(path, params=params).json()["data"]]

    assert ids("/v1/models", after=DEMO, limit=2) == sorted(NAMES)[:2]  # after the base
    assert ids("/v1/models", after="0", limit=1) == [sorted(NAMES)[0]]  # sorts first
    assert ids("/v1/models", after="p05x", limit=2) == ["p06", "p07"]  # not a stored name
    last = client.get("/v1/models", params={"after": "zz"}).json()
    assert last["data"] == [] and last["has_more"] is False and last["first_id"] is None
    assert ids("/v1/adapters", after="p21") == ["p22", "zz"]  # no limit: the rest


@pytest.mark.parametrize("path", ["/v1/models", "/v1/adapters"])
@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", "10001", ""])
def test_a_bad_limit_is_a_400_naming_it(client: TestClient, path: str, value: str) -> None:
    assert_error(client.get(path, params={"limit": value}), 400, param="limit")


@pytest.mark.parametrize("path", ["/v1/models", "/v1/adapters"])
@pytest.mark.parametrize("value", ["", "x" * 257])
def test_a_bad_after_is_a_400_naming_it(client: TestClient, path: str, value: str) -> None:
    assert_error(client.get(path, params={"after": value}), 400, param="after")


def test_listings_follow_uploads_and_deletes_at_once(client: TestClient) -> None:
    before = client.get("/v1/models").json()
    client.get("/v1/adapters")  # both listings rendered (and cached) before the change
    assert upload(client, "p10a", *demo_files("upper")).status_code == 201
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert models == [DEMO, *sorted([*NAMES, "p10a"])]
    assert "p10a" in [a["name"] for a in client.get("/v1/adapters").json()["data"]]
    page = client.get("/v1/models", params={"after": "p10", "limit": 1}).json()
    assert [m["id"] for m in page["data"]] == ["p10a"]
    assert upload(client, "p10a", *demo_files("upper")).status_code == 201  # a new version
    assert [a["version"] for a in client.get("/v1/adapters").json()["data"]
            if a["name"] == "p10a"] == [2]
    assert client.delete("/v1/adapters/p10a").status_code == 200
    assert client.get("/v1/models").json() == before
    assert "p10a" not in [a["name"] for a in client.get("/v1/adapters").json()["data"]]


def test_the_listing_is_valid_json_of_the_declared_schema(client: TestClient) -> None:
    r = client.get("/v1/models", params={"limit": 3})
    assert r.headers["content-type"] == "application/json"
    body = ModelList.model_validate_json(r.content)
    assert body.has_more and len(body.data) == 3 and body.last_id == body.data[-1].id


def test_listing_schema_is_documented(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    params = {p["name"] for p in spec["paths"]["/v1/models"]["get"]["parameters"]}
    assert {"limit", "after"} <= params
    schema = spec["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]
    assert "ModelList" in json.dumps(schema)


def test_fast_rendering_matches_the_pydantic_models(client: TestClient) -> None:
    """The listings are rendered as text; each item must be exactly what the schema (and the
    pydantic-rendered detail endpoint) says."""
    from hotlora.server.schemas import AdapterInfo, ModelCard

    for item in client.get("/v1/adapters").json()["data"]:
        assert AdapterInfo(**item).model_dump() == item
        detail = client.get(f"/v1/adapters/{item['name']}").json()
        assert {k: detail[k] for k in item} == item
    for card in client.get("/v1/models").json()["data"]:
        assert ModelCard(**card).model_dump() == card
