"""EngineCore bookkeeping between steps, driven directly (no HTTP, no thread)."""

from __future__ import annotations

import pytest

from hotlora.adapters.cache import ByteLRU
from hotlora.adapters.demo_tasks import DEMO_ADAPTERS, DEMO_MODEL, prompt_for
from hotlora.server.engine import Engine, EngineConfig, SamplingParams
from hotlora.server.engine.core import Ask, EngineCore, LoopConfig, Query, Reply
from hotlora.server.metrics import CoreMetrics


def test_merge_policy_skips_a_retired_version_that_still_has_rows() -> None:
    engine = Engine.from_pretrained(DEMO_MODEL, EngineConfig(max_batch=8, max_adapters=2))
    loop = EngineCore(engine, ByteLRU(1 << 30), LoopConfig(True, 0.5, 2), CoreMetrics(2))
    engine.add_adapter("hot@1", DEMO_ADAPTERS / "upper")
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    for w in ("abc", "defg", "hij"):
        engine.add_request(prompt_for(w), "hot@1", params)
    engine.step()
    loop.retire("hot")  # a new version was uploaded: hot@1 only finishes its requests
    assert engine.adapter_counts()[0] == {"hot@1": 3}
    loop._merge_policy()  # must not try to merge the retired version
    assert engine.merged_adapter is None
    engine.add_adapter("hot@2", DEMO_ADAPTERS / "reverse")
    for w in ("abc", "defg", "hij", "klm"):
        engine.add_request(prompt_for(w), "hot@2", params)
    engine.step()
    loop._merge_policy()
    assert engine.merged_adapter == "hot@2"  # 4 of 7 rows
    while engine.has_unfinished():
        engine.step()
    loop._merge_policy()
    assert engine.merged_adapter is None and engine.free_slots == 1


def _admission_order(tenants: list[str | None]) -> list[str]:
    """Queue one request per entry (ids t<i>), two rows free; the order they are admitted."""
    from hotlora.server.engine.core import AddRequest

    engine = Engine.from_pretrained(DEMO_MODEL, EngineConfig(max_batch=2))
    loop = EngineCore(engine, ByteLRU(1 << 30), LoopConfig(False, 0.5, 2), CoreMetrics(2))
    admitted: list[str] = []
    add = engine.add_request

    def record(*args: object, request_id: str, **kw: object) -> str:
        admitted.append(request_id)
        return add(*args, request_id=request_id, **kw)  # type: ignore[arg-type]

    engine.add_request = record  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    for i, tenant in enumerate(tenants):
        loop.handle(AddRequest(f"{tenant}{i}", engine.encode(prompt_for("ab")), None, params,
                               tenant))
    while loop._pending or engine.has_unfinished():
        loop.tick()
    return admitted


def test_admission_takes_tenants_in_turn() -> None:
    """A tenant that queued 6 requests first does not make a later tenant wait for all 6."""
    order = _admission_order(["a"] * 6 + ["b"] * 2)
    assert sorted(order) == sorted(f"{t}{i}" for i, t in enumerate(["a"] * 6 + ["b"] * 2))
    assert order[:4] == ["a0", "b6", "a1", "b7"]  # turns: the tenant served longest ago first
    assert order[4:] == ["a2", "a3", "a4", "a5"]  # each tenant's own in arrival order
    # Without tenants the queue is one FIFO.
    fifo = _admission_order([None] * 6 + [None] * 2)
    assert fifo == [f"None{i}" for i in range(8)]


def test_requests_wait_in_the_core_until_a_row_is_free() -> None:
    """Only as many requests enter the engine as it has free rows: the rest stay pending in
    the core, where fair admission can still reorder them."""
    from hotlora.server.engine.core import AddRequest

    engine = Engine.from_pretrained(DEMO_MODEL, EngineConfig(max_batch=2))
    loop = EngineCore(engine, ByteLRU(1 << 30), LoopConfig(False, 0.5, 2), CoreMetrics(2))
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    for i in range(5):
        loop.handle(AddRequest(f"r{i}", engine.encode(prompt_for("ab")), None, params, "t"))
    loop.tick()
    assert engine.num_running + engine.num_waiting == 2 and len(loop._pending) == 3


def test_a_flooding_tenant_leaves_rows_for_the_others() -> None:
    """With two tenants active, one above its fair share leaves free one row more than the
    other lately held at once: the other's requests, arriving later, start at once instead of
    waiting for a row to finish."""
    from hotlora.server.engine.core import AddRequest

    engine = Engine.from_pretrained(DEMO_MODEL, EngineConfig(max_batch=8))
    loop = EngineCore(engine, ByteLRU(1 << 30), LoopConfig(False, 0.5, 2), CoreMetrics(2))
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    ids = engine.encode(prompt_for("ab"))
    for i in range(30):
        loop.handle(AddRequest(f"a{i}", ids, None, params, "a"))
    loop.tick()
    assert engine.num_running == 8  # alone, a tenant may fill every row
    loop.handle(AddRequest("b0", ids, None, short, "b"))
    while "b0" not in loop.rows.live:
        loop.tick()  # b0 waits for one of a's rows to finish ...
    for _ in range(20):
        loop.tick()  # ... and from then on a leaves 2 rows (b's peak of 1, plus 1) free
        assert loop.rows.held("a") <= 6
    assert "b0" not in loop.rows.live and engine.num_running == 6
    loop.handle(AddRequest("b1", ids, None, short, "b"))
    loop.handle(AddRequest("b2", ids, None, short, "b"))
    loop.tick()
    assert {"b1", "b2"} <= set(loop.rows.live)  # both found a free row


def test_queries_are_typed_and_unknown_messages_are_errors() -> None:
    engine = Engine.from_pretrained(DEMO_MODEL, EngineConfig(max_batch=2, max_adapters=1))
    loop = EngineCore(engine, ByteLRU(1 << 30), LoopConfig(False, 0.5, 2), CoreMetrics(1))
    loop.handle(Query(1, Ask.BARRIER))
    loop.handle(Query(2, Ask.RESIDENT))
    loop.handle(Query(3, Ask.METRICS))
    barrier, resident, metrics = loop._out
    assert barrier == Reply(1, True) and resident == Reply(2, [])
    assert isinstance(metrics.value, bytes) and b"hotlora_" in metrics.value
    # A string where an Ask belongs (the old protocol) and a message of unknown type both
    # fail loudly instead of being answered "yes".
    with pytest.raises(TypeError, match="unknown engine query"):
        loop.handle(Query(4, "ready"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown engine command"):
        loop.handle("metrics")  # type: ignore[arg-type]
