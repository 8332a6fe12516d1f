"""ByteLRU: recency order, byte accounting, eviction lists and hit/miss counters."""

from __future__ import annotations

import threading

import pytest

from hotlora.adapters.cache import ByteLRU


def test_put_get_and_counters() -> None:
    c: ByteLRU[str, int] = ByteLRU(100)
    assert c.put("a", 1, 10) == []
    assert c.get("a") == 1
    assert c.get("b") is None
    assert (c.hits, c.misses, c.evictions) == (1, 1, 0)
    assert "a" in c and "b" not in c and len(c) == 1
    assert c.bytes_used == 10 and c.capacity_bytes == 100


def test_evicts_least_recent_first_and_get_refreshes() -> None:
    c: ByteLRU[str, str] = ByteLRU(30)
    for k in "abc":
        assert c.put(k, k.upper(), 10) == []
    assert c.get("a") == "A"  # a is now the most recent: b, c, a
    assert c.keys() == ["b", "c", "a"]
    assert c.put("d", "D", 20) == ["b", "c"]  # oldest first, only as many as needed
    assert c.keys() == ["a", "d"]
    assert c.bytes_used == 30 and c.evictions == 2
    assert c.get("b") is None and c.get("c") is None


def test_contains_does_not_refresh() -> None:
    c: ByteLRU[str, int] = ByteLRU(20)
    c.put("a", 1, 10)
    c.put("b", 2, 10)
    assert "a" in c
    assert c.put("c", 3, 10) == ["a"]
    assert (c.hits, c.misses) == (0, 0)


def test_reput_replaces_size_and_refreshes_without_eviction() -> None:
    c: ByteLRU[str, int] = ByteLRU(30)
    c.put("a", 1, 10)
    c.put("b", 2, 10)
    assert c.put("a", 11, 15) == []  # 15 + 10 fits once the old a (10) is gone
    assert c.keys() == ["b", "a"] and c.bytes_used == 25 and c.evictions == 0
    assert c.get("a") == 11
    assert c.put("a", 12, 30) == ["b"]  # the old a is replaced, not evicted
    assert c.keys() == ["a"] and c.bytes_used == 30 and c.evictions == 1


def test_oversized_item_is_not_cached_and_drops_stale_value() -> None:
    c: ByteLRU[str, int] = ByteLRU(50)
    c.put("a", 1, 10)
    c.put("big", 2, 20)
    assert c.put("big", 3, 51) == ["big"]  # never admitted: nothing else is evicted
    assert "big" not in c and c.get("big") is None
    assert c.keys() == ["a"] and c.bytes_used == 10 and c.evictions == 0
    assert c.put("huge", 4, 1000) == ["huge"] and len(c) == 1


def test_exact_fit_and_zero_capacity() -> None:
    c: ByteLRU[str, int] = ByteLRU(10)
    assert c.put("a", 1, 10) == [] and c.bytes_used == 10
    assert c.put("b", 2, 10) == ["a"]
    z: ByteLRU[str, int] = ByteLRU(0)
    assert z.put("a", 1, 1) == ["a"] and len(z) == 0
    assert z.put("e", 0, 0) == [] and "e" in z


def test_pop() -> None:
    c: ByteLRU[str, int] = ByteLRU(30)
    c.put("a", 1, 10)
    c.put("b", 2, 15)
    assert c.pop("a") == 1 and c.pop("a") is None
    assert c.bytes_used == 15 and len(c) == 1
    assert (c.hits, c.misses, c.evictions) == (0, 0, 0)


def test_rejects_negative_sizes() -> None:
    with pytest.raises(ValueError):
        ByteLRU(-1)
    with pytest.raises(ValueError):
        ByteLRU[str, int](10).put("a", 1, -1)


def test_concurrent_use_keeps_accounting_consistent() -> None:
    c: ByteLRU[int, int] = ByteLRU(1000)
    start = threading.Barrier(4)

    def work(t: int) -> None:
        start.wait()
        for i in range(2000):
            k = (t * 7 + i) % 150
            if c.get(k) is None:
                c.put(k, k, 1 + k % 13)
            if i % 5 == 0:
                c.pop((k + 3) % 150)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    cached = c.keys()
    assert c.bytes_used == sum(1 + k % 13 for k in cached) <= 1000
    assert c.hits + c.misses == 4 * 2000
