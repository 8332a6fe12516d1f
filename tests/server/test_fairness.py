"""Fair admission's bookkeeping on a fake clock: turns, fair share, and the room a tenant
above its share leaves for the others (which follows their recent peak, then expires)."""

from __future__ import annotations

from dataclasses import dataclass

from hotlora.server.engine.fairness import RECENT_S, TenantRows


@dataclass
class Req:
    id: str
    tenant: str | None


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def test_turns_start_with_the_tenant_served_longest_ago() -> None:
    rows = TenantRows(8, Clock())
    rows.enter("x", "a")  # a was just served
    pending = [Req("a1", "a"), Req("a2", "a"), Req("b1", "b"), Req("c1", "c"), Req("b2", "b")]
    assert [r.id for r in rows.order(pending)] == ["b1", "c1", "a1", "b2", "a2"]
    assert rows.order([Req("n1", None), Req("n2", None)]) == [Req("n1", None), Req("n2", None)]


def test_room_follows_the_other_tenants_recent_peak() -> None:
    clock = Clock()
    rows = TenantRows(8, clock)
    rows.seen("a")
    assert rows.share() is None  # one active tenant: no rule
    rows.seen("b")
    assert rows.share() == 4
    for i in range(3):
        rows.enter(f"b{i}", "b")  # b's peak: 3 rows at once
    for i in range(3):
        rows.leave(f"b{i}")
    for i in range(4):
        rows.enter(f"a{i}", "a")
    # a holds its share (4): it must leave min(3 + 1, 4) = 4 rows free for b
    assert not rows.may_take("a", 4, rows.share())
    assert rows.may_take("a", 5, rows.share())
    assert rows.may_take("b", 1, rows.share())  # b is below its share: any free row
    clock.t += RECENT_S + 1
    rows.seen("a")
    rows.seen("b")  # both still active, but b's peak has expired: one row is kept free
    assert rows.may_take("a", 2, rows.share()) and not rows.may_take("a", 1, rows.share())


def test_leave_forgets_unknown_ids_and_frees_rows() -> None:
    rows = TenantRows(4, Clock())
    rows.enter("r", "a")
    rows.leave("nope")
    rows.leave("r")
    rows.leave("r")
    assert rows.held("a") == 0 and rows.live == {}
