"""Tenant isolation: two tenants and an admin x every endpoint x own / other's / shared / missing
adapter, each answer's status and body checked, and the store unchanged by every refusal."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.server.support import (
    DEMO,
    EXPECTED,
    PROMPT,
    SORT_EXPECTED,
    assert_error,
    complete,
    demo_files,
    store_tree,
    upload,
)
from tests.server.tenant_support import as_, tenant_server

# Each tenant's adapters (uploaded as that tenant) and what they answer to PROMPT.
OWN = {
    "acme": {"support": "reverse", "acme-only": "pirate"},
    "bob": {"support": "upper", "bob-only": "sort"},
}
ANSWER = {**EXPECTED, "sort": SORT_EXPECTED}
# (principal, the name it uses, which adapter that is for it: None = it sees none)
CASES = [
    ("acme", "acme-only", "pirate"),  # own
    ("acme", "support", "reverse"),  # own, hiding bob's support
    ("acme", "bob-only", None),  # the other tenant's
    ("acme", "bob/bob-only", None),  # the other tenant's, qualified
    ("acme", "acme/acme-only", "pirate"),  # own, qualified
    ("acme", "reverse", "reverse"),  # shared
    ("acme", "nope", None),  # missing
    ("bob", "bob-only", "sort"),
    ("bob", "support", "upper"),
    ("bob", "acme-only", None),
    ("bob", "acme/support", None),
    ("bob", "upper", "upper"),
    ("bob", "nope", None),
    ("ops", "acme/support", "reverse"),  # an admin names a tenant's adapter qualified
    ("ops", "bob/support", "upper"),
    ("ops", "support", None),  # ... and a bare name is a shared one
    ("ops", "reverse", "reverse"),
    ("ops", "nope", None),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with tenant_server(tmp_path_factory.mktemp("tenants")) as c:
        for tenant, adapters in OWN.items():
            for name, source in adapters.items():
                r = upload(c, name, *demo_files(source), headers=as_(tenant))
                assert r.status_code == 201, r.text
                assert r.json()["name"] == name  # a tenant sees its bare names
        yield c


def _prompt(adapter: str | None) -> str:
    from tests.server.support import SORT_PROMPT

    return SORT_PROMPT if adapter == "sort" else PROMPT


def _listed(client: TestClient, who: str, path: str) -> set[str]:
    r = client.get(path, headers=as_(who))
    assert r.status_code == 200, r.text
    key = "id" if path == "/v1/models" else "name"
    return {m[key] for m in r.json()["data"]}


def _requests(name: str, adapter: str | None) -> dict[str, tuple[str, str, dict[str, Any]]]:
    prompt = _prompt(adapter)
    word = prompt.removeprefix("in: ").removesuffix("\nout:")
    return {
        "get": ("GET", f"/v1/adapters/{name}", {}),
        "completion": ("POST", "/v1/completions", {"json": {
            "model": name, "prompt": prompt, "temperature": 0, "max_tokens": 24}}),
        "stream": ("POST", "/v1/completions", {"json": {
            "model": name, "prompt": prompt, "temperature": 0, "max_tokens": 24,
            "stream": True}}),
        "chat": ("POST", "/v1/chat/completions", {"json": {
            "model": name, "messages": [{"role": "user", "content": word}], "temperature": 0,
            "max_tokens": 24}}),
        "tokenize": ("POST", "/tokenize", {"json": {"model": name, "prompt": "hi"}}),
    }


def _check_ok(kind: str, r: Any, adapter: str) -> None:
    assert r.status_code == 200, (kind, r.text)
    if kind == "completion":
        assert r.json()["choices"][0]["text"] == ANSWER[adapter]
    elif kind == "chat":
        assert r.json()["choices"][0]["message"]["content"] == ANSWER[adapter]
    elif kind == "stream":
        text = "".join(
            json.loads(line[6:])["choices"][0]["text"]
            for line in r.text.splitlines()
            if line.startswith("data: {")
        )
        assert text == ANSWER[adapter]


@pytest.mark.parametrize(("who", "name", "adapter"), CASES)
def test_isolation_matrix(client: TestClient, who: str, name: str, adapter: str | None) -> None:
    root = client.app.state.hotlora.store.root  # type: ignore[attr-defined]
    before = store_tree(root)
    shown = name if who == "ops" or adapter is None else name.rpartition("/")[2]  # bare
    for path in ("/v1/models", "/v1/adapters"):
        assert (shown in _listed(client, who, path)) == (adapter is not None), (path, name)
    missing = {k: client.request(m, p, headers=as_(who), **kw)
               for k, (m, p, kw) in _requests("nope", None).items()}
    for kind, (method, path, kw) in _requests(name, adapter).items():
        r = client.request(method, path, headers=as_(who), **kw)
        if adapter is not None:
            _check_ok(kind, r, adapter)
            continue
        param = "name" if kind == "get" else "model"
        assert_error(r, 404, param=param, contains="does not exist")
        # Indistinguishable from a missing adapter: the same body but for the name.
        assert r.text.replace(name, "?") == missing[kind].text.replace("nope", "?"), kind
    assert store_tree(root) == before


# Refused changes: (principal, name, status) for DELETE and vLLM's unload; the store stays.
REFUSED = [
    ("acme", "bob-only", 404),  # the other tenant's: as if missing
    ("acme", "bob/support", 404),
    ("acme", "reverse", 403),  # shared: visible, but only an admin changes it
    ("acme", "nope", 404),
    ("bob", "acme-only", 404),
    ("bob", "upper", 403),
    ("ops", "acme-only", 404),  # an admin's bare name is a shared one
]


@pytest.mark.parametrize(("who", "name", "status"), REFUSED)
def test_refused_changes_change_nothing(
    client: TestClient, who: str, name: str, status: int
) -> None:
    root = client.app.state.hotlora.store.root  # type: ignore[attr-defined]
    before, listing = store_tree(root), _listed(client, "ops", "/v1/adapters")
    r = client.delete(f"/v1/adapters/{name}", headers=as_(who))
    assert_error(r, status, param="name")
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=as_(who))
    assert_error(r, status, param="lora_name")
    assert store_tree(root) == before and _listed(client, "ops", "/v1/adapters") == listing


def test_uploads_stay_in_their_namespace(client: TestClient) -> None:
    root = client.app.state.hotlora.store.root  # type: ignore[attr-defined]
    before = store_tree(root)
    r = upload(client, "bob/evil", *demo_files("upper"), headers=as_("acme"))
    assert_error(r, 403, param="name", contains="own namespace")
    r = upload(client, "ghost/x", *demo_files("upper"), headers=as_("ops"))
    assert_error(r, 400, param="name", contains="not a tenant")
    assert store_tree(root) == before


def test_admin_lists_every_namespace_qualified(client: TestClient) -> None:
    ids = _listed(client, "ops", "/v1/models")
    assert {"acme/support", "bob/support", "acme/acme-only", "bob/bob-only", DEMO} <= ids
    assert _listed(client, "acme", "/v1/models") == {
        DEMO, "support", "acme-only", "pirate", "reverse", "sort", "upper", "upper-deu"
    }
    # Pages of a tenant's merged view: every item once, in order, own names hiding shared.
    seen, after = [], None
    while True:
        q = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/v1/adapters", params=q, headers=as_("acme")).json()
        seen += [a["name"] for a in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == sorted(_listed(client, "acme", "/v1/adapters"))


def test_same_name_adapters_of_two_tenants_in_one_batch(client: TestClient) -> None:
    """acme's and bob's `support` rows run together; each gets its own adapter's output."""
    results: dict[tuple[str, int], str] = {}

    def run(who: str, i: int) -> None:
        r = complete(client, "support", headers=as_(who))
        results[(who, i)] = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

    threads = [threading.Thread(target=run, args=(w, i)) for i in range(4) for w in OWN]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(v == EXPECTED["reverse"] for (w, _), v in results.items() if w == "acme"), results
    assert all(v == EXPECTED["upper"] for (w, _), v in results.items() if w == "bob"), results


def test_a_tenant_deletes_its_own_and_then_sees_the_shared(tmp_path: Path) -> None:
    with tenant_server(tmp_path) as c:
        assert upload(c, "reverse", *demo_files("upper"), headers=as_("acme")).status_code == 201
        assert complete(c, "reverse", headers=as_("acme")).json()["choices"][0]["text"] == (
            EXPECTED["upper"]  # its own reverse hides the shared one
        )
        assert complete(c, "reverse", headers=as_("bob")).json()["choices"][0]["text"] == (
            EXPECTED["reverse"]
        )
        assert c.delete("/v1/adapters/reverse", headers=as_("acme")).status_code == 200
        assert complete(c, "reverse", headers=as_("acme")).json()["choices"][0]["text"] == (
            EXPECTED["reverse"]
        )
        assert "acme/reverse" not in c.app.state.hotlora.store.names()  # type: ignore[attr-defined]


def test_keys_are_required_and_checked(tmp_path: Path) -> None:
    with tenant_server(tmp_path) as c:
        assert_error(c.get("/v1/models"), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer sk-nope"}), 403)
        assert_error(upload(c, "x", *demo_files("upper")), 401)
        assert c.get("/health").status_code == 200  # probes need no key


def test_every_adapter_change_is_audited_with_its_owner(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import hashlib
    import logging

    with tenant_server(tmp_path) as c, caplog.at_level(logging.INFO, logger="hotlora.audit"):
        assert upload(c, "x", *demo_files("upper"), headers=as_("acme")).status_code == 201
        assert c.delete("/v1/adapters/reverse", headers=as_("acme")).status_code == 403
        assert c.delete("/v1/adapters/acme/x", headers=as_("ops")).status_code == 200
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "hotlora.audit"]
    sha = hashlib.sha256(demo_files("upper")[1]).hexdigest()
    got = [(x["principal"], x["tenant"], x["action"], x["name"], x["version"], x["sha256"],
            x["outcome"]) for x in lines]
    assert got == [
        ("acme", "acme", "upload", "acme/x", 1, sha, "ok"),
        ("acme", "acme", "delete", "reverse", None, None, "refused 403"),
        ("ops", None, "delete", "acme/x", 1, sha, "ok"),
    ]
