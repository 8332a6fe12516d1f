"""load_tests/bench_scale.py without a server: its store of shared-file adapters is a real
store (every adapter loads), the in-process parts run at tiny sizes, the table prints."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

from hotlora.adapters.store import AdapterStore  # noqa: E402

import bench_scale  # noqa: E402
import common  # noqa: E402


def test_help_and_part_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        bench_scale.build_parser().parse_args(["--help"])
    assert e.value.code == 0 and "--smoke" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown parts"):
        bench_scale.main(["--only", "store,nope"])


def test_the_built_store_holds_real_adapters(tmp_path: Path) -> None:
    root = tmp_path / "store"
    bench_scale.build_store(root, common.DEMO_MODEL, 30, bench_scale.DEMO_ADAPTER, 16)
    store = AdapterStore(root, bench_scale.base_shapes(common.DEMO_MODEL), 16)
    assert store.count() == 30 and store.names()[0] == bench_scale.adapter_name(0)
    for name in (bench_scale.adapter_name(0), bench_scale.adapter_name(29)):
        v = store.latest(name)
        assert v is not None and v.kind == "lora"
        assert store.load(v).lora is not None
    rows = bench_scale.store_open(root, common.DEMO_MODEL, 16, 30)
    assert rows[0].ok is True and all(r.value is not None for r in rows)


def test_cold_load_runs_at_tiny_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = bench_scale.cold_load(tmp_path, "tiny", rank=4, loads=12, distinct=3)
    assert rows[1].target == "<= 20 ms" and rows[1].value is not None
    assert "dominant" in rows[1].note
    out = capsys.readouterr().out
    assert "cold-load profile" in out
    served = bench_scale.Row("  alpha=1 / N=1", 91.234, "%", ">= 80%", True, "400 requests")
    bench_scale.print_table([*rows, served, bench_scale.Row("hot swap", None, "ms")])
    table = capsys.readouterr().out
    assert "cold load tiny rank 4" in table and "91.2 %" in table and "yes" in table


def test_served_counters_by_tier() -> None:
    """/metrics deltas -> loads and evictions by tier, as the throughput rows print them."""
    delta = {
        'hotlora_adapter_loads_total{kind="lora",outcome="ok",tier="disk"}': 9.0,
        'hotlora_adapter_loads_total{kind="lora",outcome="error",tier="disk"}': 1.0,
        'hotlora_adapter_loads_total{kind="lora",outcome="ok",tier="cpu"}': 3.0,
        'hotlora_adapter_evictions_total{tier="device"}': 0.0,
        "hotlora_adapter_loads_total": 13.0,
    }
    loads = bench_scale._by_tier(delta, "hotlora_adapter_loads_total")
    assert loads == {"disk": 10, "cpu": 3}
    assert bench_scale._tiers(loads) == "13 (cpu 3, disk 10)"
    evictions = bench_scale._by_tier(delta, "hotlora_adapter_evictions_total")
    assert bench_scale._tiers(evictions) == "0" and bench_scale._tiers({}) == "0"
    args = bench_scale.build_parser().parse_args(["--alphas", "1,0.5", "--only", "throughput"])
    assert args.alphas == [1.0, 0.5] and args.swaps == 20 and args.concurrency == 32
