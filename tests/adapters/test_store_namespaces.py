"""Tenant namespaces in the adapter store: qualified names on disk and across restarts, the
merged view a tenant lists (own names hiding shared ones, paged), usage and quotas (exact at
their bounds, refused uploads writing nothing, racing uploads unable to both pass)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hotlora.adapters.store import AdapterStore, Quota, QuotaExceeded
from tests.adapters.conftest import BASE
from tests.adapters.test_store import MAX_RANK, blobs, tree


def _open(root: Path) -> AdapterStore:
    return AdapterStore(root, BASE, max_rank=MAX_RANK, max_bytes=1 << 20)


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return _open(tmp_path / "store")


def test_qualified_names_on_disk_and_after_a_restart(store: AdapterStore) -> None:
    v, _ = store.put("acme/support", *blobs())
    shared, _ = store.put("support", *blobs())
    assert (v.tenant, v.short_name, v.key) == ("acme", "support", "acme/support@1")
    assert v.path == store.root / "acme~support" / "v1" and shared.tenant is None
    again = _open(store.root)
    assert again.latest("acme/support") == v and again.latest("support") == shared
    assert again.usage("acme").adapters == 1 and again.usage(None).adapters == 1
    assert again.delete("acme/support") == [v] and again.latest("support") == shared
    assert not (store.root / "acme~support").exists()


def test_a_tenant_view_merges_own_and_shared_names(store: AdapterStore) -> None:
    for name in ("a", "c", "e", "acme/b", "acme/c", "acme/f", "bob/a", "bob/d"):
        store.put(name, *blobs())
    view = ("acme", None)
    names, more = store.view_page(view)
    assert [v.name for v in names] == ["a", "acme/b", "acme/c", "e", "acme/f"] and not more
    # every page continues after the previous page's last short name; nothing twice or lost
    seen, after = [], None
    while True:
        page, more = store.view_page(view, after, 2)
        seen += [v.short_name for v in page]
        if not more:
            break
        after = page[-1].short_name
    assert seen == ["a", "b", "c", "e", "f"]
    assert [v.name for v in store.view_page((None,))[0]] == ["a", "c", "e"]
    assert [v.name for v in store.page()[0]][:3] == ["a", "acme/b", "acme/c"]  # admin: all


def test_usage_counts_every_version(store: AdapterStore) -> None:
    v1, _ = store.put("acme/x", *blobs())
    v2, _ = store.put("acme/x", *blobs())
    store.put("bob/x", *blobs())
    assert store.usage("acme").adapters == 1
    assert store.usage("acme").bytes == v1.size_bytes + v2.size_bytes
    store.delete("acme/x")
    assert store.usage("acme").adapters == 0 and store.usage("acme").bytes == 0


def test_quotas_refuse_exactly_past_their_bound(store: AdapterStore) -> None:
    size = store.put("acme/a", *blobs())[0].size_bytes
    quota = Quota(max_adapters=2, max_bytes=3 * size)
    store.put("acme/b", *blobs(), quota=quota)  # the second adapter: at the bound
    before = tree(store.root)
    with pytest.raises(QuotaExceeded) as info:
        store.put("acme/c", *blobs(), quota=quota)
    assert info.value.limit == "max_adapters" and "max_adapters" in str(info.value)
    store.put("acme/a", *blobs(), quota=quota)  # a new version: 3 x size, at the bound
    with pytest.raises(QuotaExceeded) as info:
        store.put("acme/a", *blobs(), quota=quota)
    assert info.value.limit == "max_storage_bytes"
    assert tree(store.root) != before  # (the accepted version above)
    after = tree(store.root)
    with pytest.raises(QuotaExceeded):
        store.put("acme/b", *blobs(), quota=quota)
    assert tree(store.root) == after
    store.put("bob/a", *blobs(), quota=quota)  # another namespace has its own usage


def test_racing_uploads_cannot_both_pass_a_quota(store: AdapterStore) -> None:
    quota = Quota(max_adapters=1)
    results: list[str] = []

    def put(name: str) -> None:
        try:
            store.put(name, *blobs(), quota=quota)
            results.append("ok")
        except QuotaExceeded:
            results.append("refused")

    threads = [threading.Thread(target=put, args=(f"acme/n{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] + ["refused"] * 7
    assert store.usage("acme").adapters == 1
    assert not list((store.root / ".staging").iterdir())
