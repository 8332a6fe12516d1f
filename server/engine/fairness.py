"""Fair admission among tenants: who holds which engine rows, who was active lately, and the
two rules the engine loop admits by.

1. Tenants take turns: pending requests are ordered tenant by tenant (the tenant admitted
   longest ago first), each tenant's own in arrival order, so a tenant that queued a flood
   delays only itself.
2. Rows are not preempted, so a tenant above its fair share (rows / active tenants) must leave
   free, for each other active tenant, one row more than the most that tenant held at once
   lately (up to its share; at least one): a tenant arriving during another's flood finds a
   row at once instead of waiting for one to finish.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

RECENT_S = 10.0  # a tenant that sent a request this recently is active


class HasTenant(Protocol):
    @property
    def tenant(self) -> str | None: ...


P = TypeVar("P", bound=HasTenant)


class TenantRows:
    def __init__(self, max_rows: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_rows, self._clock = max_rows, clock
        self.live: dict[str, str | None] = {}  # requests holding a row -> their tenant
        self._held: dict[str | None, int] = {}  # rows per tenant
        self._seen: dict[str | None, float] = {}  # tenant -> when it last sent a request
        # tenant -> the most rows it held at once lately, and since when (reset after RECENT_S)
        self._peak: dict[str | None, tuple[int, float]] = {}
        self._turns = 0  # admissions so far; _last_turn[tenant] = the count at its last
        self._last_turn: dict[str | None, int] = {}

    def seen(self, tenant: str | None) -> None:
        """A request of `tenant` arrived."""
        if tenant is not None:
            self._seen[tenant] = self._clock()

    def held(self, tenant: str | None) -> int:
        return self._held.get(tenant, 0)

    def order(self, pending: Sequence[P]) -> list[P]:
        """`pending` in the order rule 1 admits it."""
        if all(p.tenant is None for p in pending):
            return list(pending)
        queues: dict[str | None, list[P]] = {}
        for p in pending:
            queues.setdefault(p.tenant, []).append(p)
        turns = sorted(queues.values(), key=lambda q: self._last_turn.get(q[0].tenant, -1))
        out: list[P] = []
        for i in range(max(len(q) for q in turns)):
            out.extend(q[i] for q in turns if i < len(q))
        return out

    def share(self) -> float | None:
        """Rows per active tenant; None while fewer than two are active (rule 2 is off)."""
        now = self._clock()
        active = sum(1 for t, at in self._seen.items() if t is not None and now - at < RECENT_S)
        return None if active < 2 else self.max_rows / active

    def may_take(self, tenant: str | None, free: int, share: float | None) -> bool:
        """Whether rule 2 lets `tenant` take one of `free` rows."""
        if share is None or tenant is None or self.held(tenant) < share:
            return True
        now, room = self._clock(), 0
        for other, seen in self._seen.items():
            if other is None or other == tenant or now - seen >= RECENT_S:
                continue
            peak, since = self._peak.get(other, (0, 0.0))
            peak = peak if now - since <= RECENT_S else 0
            room += max(1, min(peak + 1, math.ceil(share)) - self.held(other))
        return free - 1 >= room

    def enter(self, request_id: str, tenant: str | None) -> None:
        """A request of `tenant` took a row."""
        self.live[request_id] = tenant
        self._held[tenant] = held = self.held(tenant) + 1
        self._turns += 1
        self._last_turn[tenant] = self._turns
        now = self._clock()
        peak, since = self._peak.get(tenant, (0, 0.0))
        if held >= peak or now - since > RECENT_S:
            self._peak[tenant] = (held, now)

    def leave(self, request_id: str) -> None:
        """A request gave its row back (finished, aborted or failed); unknown ids are ignored."""
        if request_id not in self.live:
            return
        tenant = self.live.pop(request_id)
        left = self._held[tenant] - 1
        if left:
            self._held[tenant] = left
        else:
            del self._held[tenant]
