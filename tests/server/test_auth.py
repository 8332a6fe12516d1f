"""Bearer keys: the admin key guards adapter mutations, API keys guard completions and models."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hotlora.adapters.demo_tasks import DEMO_ADAPTERS
from tests.server.support import (
    DEMO,
    EXPECTED,
    Response,
    assert_error,
    bearer,
    complete,
    demo_files,
    make_settings,
    serve,
    store_tree,
    upload,
)

ADMIN, API_KEYS = "adm-secret", ["k1", "k2"]


@dataclass
class Env:
    client: TestClient
    store: Path
    allowed: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("auth")
    allowed = root / "allowed"
    shutil.copytree(DEMO_ADAPTERS / "upper", allowed / "upper")
    settings = make_settings(
        root, admin_key=ADMIN, api_keys=API_KEYS, allowed_adapter_dirs=[allowed]
    )
    with serve(settings) as client:
        yield Env(client, root / "store", allowed)


Mutation = Callable[[Env, dict[str, str]], Response]
MUTATIONS: dict[str, Mutation] = {
    "upload": lambda e, h: upload(e.client, "by-admin", *demo_files("upper"), headers=h),
    "delete": lambda e, h: e.client.delete("/v1/adapters/sort", headers=h),
    "load": lambda e, h: e.client.post(
        "/v1/load_lora_adapter",
        json={"lora_name": "loaded-by-admin", "lora_path": str(e.allowed / "upper")},
        headers=h,
    ),
    "unload": lambda e, h: e.client.post(
        "/v1/unload_lora_adapter", json={"lora_name": "pirate"}, headers=h
    ),
}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer"}, 401),
        ({"Authorization": f"Basic {ADMIN}"}, 401),
        ({"Authorization": "Bearer wrong"}, 403),
        ({"Authorization": f"Bearer {ADMIN}x"}, 403),
        (bearer(API_KEYS[0]), 403),  # an API key is not an admin key
    ],
    ids=["none", "empty-bearer", "basic", "wrong", "prefix-of-longer", "api-key"],
)
@pytest.mark.parametrize("op", list(MUTATIONS))
def test_mutations_without_the_admin_key_are_refused(
    env: Env, op: str, headers: dict[str, str], status: int
) -> None:
    tree, listing = (
        store_tree(env.store),
        env.client.get("/v1/adapters", headers=bearer(ADMIN)).json(),
    )
    r = MUTATIONS[op](env, headers)
    err = assert_error(r, status)
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in err["message"]
    assert store_tree(env.store) == tree
    assert env.client.get("/v1/adapters", headers=bearer(ADMIN)).json() == listing


def test_mutations_with_the_admin_key_succeed(env: Env) -> None:
    h = bearer(ADMIN)
    assert MUTATIONS["upload"](env, h).status_code == 201
    assert MUTATIONS["delete"](env, h).status_code == 200
    assert MUTATIONS["load"](env, h).status_code == 200
    assert MUTATIONS["unload"](env, h).status_code == 200
    names = [
        a["name"] for a in env.client.get("/v1/adapters", headers=bearer(ADMIN)).json()["data"]
    ]
    assert names == ["by-admin", "loaded-by-admin", "reverse", "upper", "upper-deu"]
    r = complete(env.client, "loaded-by-admin", headers=bearer(API_KEYS[1]))
    assert r.json()["choices"][0]["text"] == EXPECTED["upper"]


READS: dict[str, Callable[[TestClient, dict[str, str]], Response]] = {
    "completions": lambda c, h: complete(c, "reverse", headers=h),
    "models": lambda c, h: c.get("/v1/models", headers=h),
}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Token k1"}, 401),
        ({"Authorization": "Bearer nope"}, 403),
        (bearer(API_KEYS[0]), 200),
        (bearer(API_KEYS[1]), 200),
        (bearer(ADMIN), 200),  # the admin key may use everything
    ],
    ids=["none", "other-scheme", "wrong", "key1", "key2", "admin"],
)
@pytest.mark.parametrize("what", list(READS))
def test_completions_and_models_need_an_api_key(
    env: Env, what: str, headers: dict[str, str], status: int
) -> None:
    r = READS[what](env.client, headers)
    if status == 200:
        assert r.status_code == 200, r.text
        if what == "completions":
            assert r.json()["choices"][0]["text"] == EXPECTED["reverse"]
        else:
            assert r.json()["data"][0]["id"] == DEMO
    else:
        assert_error(r, status, contains="completions")


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_probes_and_metrics_need_no_key(env: Env, path: str) -> None:
    assert env.client.get(path).status_code == 200


@pytest.mark.parametrize("path", ["/v1/adapters", "/v1/adapters/reverse"])
def test_adapter_listing_needs_an_api_key_like_models(env: Env, path: str) -> None:
    assert_error(env.client.get(path), 401)
