"""load_tests/bench_scale.py without a server: its store of shared-file adapters is a real
store (every adapter loads), the in-process parts run at tiny sizes, the table prints."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "load_tests"))

import bench_scale  # noqa: E402
import common  # noqa: E402

from adapters.store import AdapterStore  # noqa: E402


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
    bench_scale.print_table(rows + bench_scale.hot_swap_latency(bench_scale.build_parser()
                                                                .parse_args([])))
    table = capsys.readouterr().out
    assert "cold load tiny rank 4" in table and bench_scale.NOT_MEASURED in table
