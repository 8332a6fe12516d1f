"""The adapter store's in-memory index: every listed version by qualified name, the names sorted
(all of them, and per namespace), and each namespace's usage for quotas.

A lookup is O(1) and a page O(log n + page); one lock guards it for microseconds at a time, so
readers never wait for a disk. The store (adapters/store.py) is the only writer.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from hotlora.adapters.version import AdapterVersion, split_name


@dataclass(frozen=True)
class Usage:
    """What a namespace holds: adapter names and bytes over every stored version."""

    adapters: int
    bytes: int


class StoreIndex:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[str, list[AdapterVersion]] = {}  # qualified name -> oldest first
        self._sorted: list[str] = []  # every qualified name with a listed version, sorted
        self._by_ns: dict[str | None, list[str]] = {}  # namespace -> its short names, sorted
        self._bytes: dict[str | None, int] = {}  # namespace -> bytes of its listed versions
        # Version numbers seen but not (or no longer) listed, so numbers are never reused: only
        # names whose highest number is above their newest listed version are here.
        self._high: dict[str, int] = {}
        self.generation = 0  # grows with every change

    # ------------------------------------------------------------------ writing (the store)

    def install(self, versions: dict[str, list[AdapterVersion]], high: dict[str, int]) -> None:
        """Replace the index with a scan of the tree, keeping every version number seen."""
        high = dict(high)
        with self._lock:
            for name, h in self._high.items():
                high[name] = max(high.get(name, 0), h)
            for name, vs in self._versions.items():
                high[name] = max(high.get(name, 0), vs[-1].version)
            by_ns: dict[str | None, list[str]] = {}
            nbytes: dict[str | None, int] = {}
            for name in sorted(versions):
                tenant, short = split_name(name)
                by_ns.setdefault(tenant, []).append(short)
                nbytes[tenant] = nbytes.get(tenant, 0) + sum(v.size_bytes for v in versions[name])
            self._versions = versions
            self._sorted = sorted(versions)
            self._by_ns, self._bytes = by_ns, nbytes
            self._high = {
                n: h for n, h in high.items()
                if n not in versions or versions[n][-1].version < h
            }
            self.generation += 1

    def next_version(self, name: str) -> int:
        with self._lock:
            listed = self._versions.get(name)
            return max(self._high.get(name, 0), listed[-1].version if listed else 0) + 1

    def add(self, v: AdapterVersion) -> None:
        tenant, short = split_name(v.name)
        with self._lock:
            versions = self._versions.get(v.name)
            if versions is None:
                self._versions[v.name] = [v]
                bisect.insort(self._sorted, v.name)
                bisect.insort(self._by_ns.setdefault(tenant, []), short)
            else:
                versions.append(v)
            self._bytes[tenant] = self._bytes.get(tenant, 0) + v.size_bytes
            if self._high.get(v.name, 0) <= v.version:
                self._high.pop(v.name, None)
            self.generation += 1

    def remove(self, name: str) -> list[AdapterVersion]:
        tenant, short = split_name(name)
        with self._lock:
            removed = self._versions.pop(name, [])
            if removed:
                del self._sorted[bisect.bisect_left(self._sorted, name)]
                names = self._by_ns[tenant]
                del names[bisect.bisect_left(names, short)]
                if not names:
                    del self._by_ns[tenant]
                self._bytes[tenant] -= sum(v.size_bytes for v in removed)
                self._high[name] = max(self._high.get(name, 0), removed[-1].version)
                self.generation += 1
            return removed

    # ------------------------------------------------------------------ reading

    def latest(self, name: str) -> AdapterVersion | None:
        with self._lock:
            versions = self._versions.get(name)
            return versions[-1] if versions else None

    def get(self, name: str, version: int) -> AdapterVersion | None:
        with self._lock:
            versions = self._versions.get(name)
            if not versions:
                return None
            i = bisect.bisect_left(versions, version, key=lambda v: v.version)
            return versions[i] if i < len(versions) and versions[i].version == version else None

    def versions(self, name: str) -> list[AdapterVersion]:
        with self._lock:
            return list(self._versions.get(name, ()))

    def names(self) -> list[str]:
        with self._lock:
            return list(self._sorted)

    def count(self) -> int:
        return len(self._sorted)

    def usage(self, tenant: str | None) -> Usage:
        with self._lock:
            return Usage(len(self._by_ns.get(tenant, ())), self._bytes.get(tenant, 0))

    def page(
        self, after: str | None, limit: int | None
    ) -> tuple[list[AdapterVersion], bool]:
        """Every namespace, by qualified name."""
        with self._lock:
            names = self._sorted
            i = 0 if after is None else bisect.bisect_right(names, after)
            j = len(names) if limit is None else min(len(names), i + max(limit, 0))
            return [self._versions[n][-1] for n in names[i:j]], j < len(names)

    def view_page(
        self, namespaces: Sequence[str | None], after: str | None, limit: int | None
    ) -> tuple[list[AdapterVersion], bool]:
        """What a caller who sees `namespaces` lists, by short name: the namespaces' names
        merged, an earlier namespace hiding a later one's adapter of the same name (a tenant's
        own `support` hides the shared `support`)."""
        with self._lock:
            lists = [self._by_ns.get(ns, []) for ns in namespaces]
            pos = [0 if after is None else bisect.bisect_right(ns, after) for ns in lists]
            out: list[AdapterVersion] = []
            while limit is None or len(out) < limit:
                heads = [lst[p] for lst, p in zip(lists, pos, strict=True) if p < len(lst)]
                if not heads:
                    return out, False
                short = min(heads)
                owner: str | None = None
                found = False
                for k, (lst, p) in enumerate(zip(lists, pos, strict=True)):
                    if p < len(lst) and lst[p] == short:
                        if not found:
                            owner, found = namespaces[k], True
                        pos[k] += 1
                qualified = short if owner is None else f"{owner}/{short}"
                out.append(self._versions[qualified][-1])
            more = any(p < len(lst) for lst, p in zip(lists, pos, strict=True))
            return out, more
