"""A thread-safe LRU cache bounded by bytes (adapter weights held on the CPU)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Least-recently-used cache whose total of caller-declared sizes stays <= capacity_bytes.

    Only ``get`` and ``put`` refresh recency; ``in`` and ``pop`` do not, so that checking
    for or removing an entry does not distort eviction order or the hit rate.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self._capacity = capacity_bytes
        self._lock = threading.Lock()
        # Oldest first: key -> (value, nbytes).
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._used = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def get(self, key: K) -> V | None:
        """The cached value (now most recent), or None; counts a hit or a miss."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self._misses += 1
                return None
            self._items.move_to_end(key)
            self._hits += 1
            return item[0]

    def put(self, key: K, value: V, nbytes: int) -> list[K]:
        """Cache ``value`` as the most recent entry; returns the keys evicted, oldest first.

        Re-putting a key replaces its value and size (not an eviction). An item larger than the
        whole capacity is not cached, and any older value of that key is dropped so it cannot be
        served stale; the result is then ``[key]`` and nothing else is evicted.
        """
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._used -= old[1]
            if nbytes > self._capacity:
                return [key]
            evicted: list[K] = []
            while self._used + nbytes > self._capacity:
                victim, (_, size) = self._items.popitem(last=False)
                self._used -= size
                evicted.append(victim)
            self._evictions += len(evicted)
            self._items[key] = (value, nbytes)
            self._used += nbytes
            return evicted

    def pop(self, key: K) -> V | None:
        """Remove and return ``key``'s value (None if absent); not counted as hit, miss or
        eviction."""
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self._used -= item[1]
            return item[0]

    def keys(self) -> list[K]:
        """A snapshot of the cached keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return self._used

    @property
    def hits(self) -> int:
        with self._lock:
            return self._hits

    @property
    def misses(self) -> int:
        with self._lock:
            return self._misses

    @property
    def evictions(self) -> int:
        with self._lock:
            return self._evictions
