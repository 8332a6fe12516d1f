"""The step API the server builds on: admission, abort, and adapter lifetimes under requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hotlora.server.engine import Engine, EngineConfig, EngineError, RequestError, SamplingParams
from tests.helpers import make_hf_model, make_peft_adapter

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Engine, Path, Any]:
    hf = make_hf_model(tmp_path / "base")
    make_peft_adapter(hf, tmp_path / "a", seed=3)
    make_peft_adapter(hf, tmp_path / "b", seed=4)
    engine = Engine.from_pretrained(
        tmp_path / "base", EngineConfig(max_batch=2, max_adapters=2, max_rank=4)
    )
    return engine, tmp_path / "a", hf


def _drain(engine: Engine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


def test_removing_an_adapter_in_use_lets_running_requests_finish(
    setup: tuple[Engine, Path, Any],
) -> None:
    engine, adapter, _ = setup
    engine.add_adapter("a", adapter)
    want = engine.generate([[1, 2, 3]], ["a"], GREEDY)[0].token_ids
    rid = engine.add_request([1, 2, 3], "a", GREEDY)
    first = engine.step()  # prefill: the request now holds the adapter's slot
    engine.remove_adapter("a")
    assert engine.adapters == []
    with pytest.raises(RequestError, match="not loaded"):
        engine.add_request([1], "a", GREEDY)
    engine.add_adapter("a", adapter.parent / "b")  # the name is free at once: new weights, new slot
    assert not engine.free_slots
    got = first[0].new_token_ids + _drain(engine)[rid]
    assert got == want  # finished on the removed adapter's weights
    assert engine.free_slots == 1  # the old slot came back when its request finished
    assert (
        engine.generate([[1, 2, 3]], ["a"], GREEDY)[0].token_ids != want
    )  # new requests: new weights


def test_first_token_comes_from_prefill_and_stream_concatenates_to_generate(
    setup: tuple[Engine, Path, Any],
) -> None:
    engine, _, _ = setup
    want = engine.generate(["hello"], params=GREEDY)[0]
    rid = engine.add_request("hello", None, GREEDY)
    first = engine.step()
    assert [o.request_id for o in first] == [rid] and len(first[0].new_token_ids) == 1
    text = first[0].new_text
    ids = list(first[0].new_token_ids)
    while engine.has_unfinished():
        for o in engine.step():
            ids += o.new_token_ids
            text += o.new_text
            if o.finished:
                assert o.finish_reason == "length"
    assert ids == want.token_ids and text == want.text


def test_abort_frees_row_and_adapter(setup: tuple[Engine, Path, Any]) -> None:
    engine, adapter, _ = setup
    engine.add_adapter("a", adapter)
    r1 = engine.add_request([1, 2], "a", GREEDY)
    r2 = engine.add_request([3], None, GREEDY)
    r3 = engine.add_request([4], "a", GREEDY)  # waits: only 2 rows
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1
    assert engine.abort_request(r1) and engine.abort_request(r3)
    assert not engine.abort_request("nope")
    engine.remove_adapter("a")
    assert engine.free_slots == 2  # no request holds the adapter any more
    assert set(_drain(engine)) == {r2}
    assert engine.kv.free_rows == 2


def test_slots_full_and_duplicate_names_are_refused_without_side_effects(
    setup: tuple[Engine, Path, Any],
) -> None:
    engine, adapter, _ = setup
    engine.add_adapter("a", adapter)
    with pytest.raises(EngineError, match="already loaded"):
        engine.add_adapter("a", adapter)
    engine.add_adapter("b", adapter)
    with pytest.raises(EngineError, match="slots"):
        engine.add_adapter("c", adapter)
    assert engine.adapters == ["a", "b"]
    with pytest.raises(EngineError, match="not loaded"):
        engine.remove_adapter("c")


def test_rows_stay_contiguous_as_requests_finish_and_outputs_equal_solo(
    setup: tuple[Engine, Path, Any],
) -> None:
    engine, adapter, _ = setup
    engine.add_adapter("a", adapter)
    lengths = [2, 9, 4, 7, 3, 8]
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11], [12, 13]]
    names: list[str | None] = ["a", None, "a", None, "a", None]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    ids = [engine.add_request(p, a, sp) for p, a, sp in zip(prompts, names, params, strict=True)]
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
        rows = sorted(r.row for r in engine._running.values())
        assert rows == list(range(len(rows)))  # holes are filled at once
    for rid, p, a, sp in zip(ids, prompts, names, params, strict=True):
        assert got[rid] == engine.generate([p], [a], sp)[0].token_ids
