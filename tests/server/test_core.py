"""EngineCore bookkeeping between steps, driven directly (no HTTP, no thread)."""

from __future__ import annotations

from adapters.cache import ByteLRU
from adapters.demo_tasks import DEMO_ADAPTERS, DEMO_MODEL, prompt_for
from server.engine import Engine, EngineConfig, SamplingParams
from server.engine.core import EngineCore, LoopConfig
from server.metrics import CoreMetrics


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
