"""AdapterStore.latest_fresh: two stores (two servers) on one root see each other's uploads
and deletes at the next lookup; the namespaces' resolve uses it when the store is shared.
Needs no Ray."""

from __future__ import annotations

import time
from pathlib import Path

from hotlora.adapters.store import AdapterStore
from hotlora.server.namespaces import resolve
from hotlora.server.tenants import Principal
from tests.adapters.conftest import BASE
from tests.adapters.test_store import MAX_RANK, blobs


def _pair(tmp_path: Path) -> tuple[AdapterStore, AdapterStore]:
    root = tmp_path / "store"
    a = AdapterStore(root, BASE, max_rank=MAX_RANK, shared=True)
    return a, AdapterStore(root, BASE, max_rank=MAX_RANK, shared=True)


def test_uploads_and_deletes_of_another_store(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    v1, _ = a.put("x", *blobs())
    assert b.latest("x") is None  # the plain index: what it found at open
    assert b.latest_fresh("x") == v1
    v2, _ = a.put("x", *blobs())
    seen = b.latest_fresh("x")
    assert seen is not None and seen.version == 2 and seen.sha256 == v2.sha256
    assert [v.version for v in b.versions("x")] == [1, 2]
    a.delete("x")
    assert b.latest_fresh("x") is None and b.latest("x") is None and "x" not in b.names()
    v3, _ = b.put("x", *blobs())  # numbers still grow: a stale key is never reused
    assert v3.version == 3 and a.latest_fresh("x") == v3
    assert a.latest_fresh("../etc") is None and a.latest_fresh("nope") is None


def test_own_writes_stay_and_resolve_uses_the_disk(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    v1, _ = a.put("y", *blobs())
    assert a.latest_fresh("y") == v1
    admin = Principal(name="admin", role="admin")
    assert resolve(b, admin, "y") == v1
    b.shared = False
    a.put("y", *blobs())
    assert resolve(b, admin, "y") == v1  # unshared: the index as it is
    b.shared = True
    got = resolve(b, admin, "y")
    assert got is not None and got.version == 2


def test_fresh_lookup_is_cheap(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    a.put("z", *blobs())
    b.latest_fresh("z")
    t = time.perf_counter()
    for _ in range(1000):
        b.latest_fresh("z")
    per_call = (time.perf_counter() - t) / 1000
    assert per_call < 1e-3, per_call  # one listdir, no meta.json read when nothing changed
