"""Fast checks of the load-test scripts: imports, argument parsing, the workload math, and a
tiny bench_serving run against in-process hotlora and baseline servers on the demo model."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LOAD_TESTS = REPO / "load_tests"

import bench_gpu_kernels  # noqa: E402
import bench_offline  # noqa: E402
import bench_roofline  # noqa: E402

import baseline_server  # noqa: E402
import bench_serving  # noqa: E402
import common  # noqa: E402
import soak  # noqa: E402

SCRIPTS = {
    "bench_serving": bench_serving.build_parser,
    "baseline_server": baseline_server.build_parser,
    "soak": soak.build_parser,
    "bench_gpu_kernels": bench_gpu_kernels.build_parser,
    "bench_offline": bench_offline.build_parser,
    "bench_roofline": bench_roofline.build_parser,
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_exits_zero(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        SCRIPTS[name]().parse_args(["--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_bench_serving_needs_exactly_one_target() -> None:
    with pytest.raises(SystemExit) as e:
        bench_serving.main(["--num-requests", "1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        bench_serving.main(["--url", "http://10.0.0.1:8000"])  # not loopback


def test_locustfile_imports_and_locust_parses_it() -> None:
    # A subprocess: importing locust monkey-patches the interpreter with gevent. Run from
    # load_tests/, as locust itself imports the file (its folder first on sys.path).
    code = (
        "import locustfile as l; "
        "print(sorted(c.__name__ for c in (l.CompletionUser, l.StreamUser, l.AdminUser)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=LOAD_TESTS, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "AdminUser" in out.stdout


def test_gpu_check_dry_run() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", str(LOAD_TESTS / "gpu_check.sh"), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "pytest -m gpu tests/kernels tests/engine" in out.stdout
    assert "bench_roofline.py --device cuda" in out.stdout and "dry-run: ok" in out.stdout


# ---------------------------------------------------------------------------- workload math


def test_popularity_alpha_one_is_uniform() -> None:
    for n in (1, 2, 7, 32, 128):
        p = common.popularity(n, 1.0)
        assert len(p) == n
        assert all(abs(x - 1 / n) < 1e-12 for x in p)


def test_popularity_smaller_alpha_is_more_skewed_and_sums_to_one() -> None:
    n = 32
    prev_top = 1 / n
    for alpha in (0.8, 0.5, 0.3, 0.1):
        p = common.popularity(n, alpha)
        assert abs(sum(p) - 1) < 1e-12
        assert all(a > b for a, b in zip(p, p[1:], strict=False))  # decreasing in i
        assert p[0] > prev_top  # more mass on the head as alpha falls
        prev_top = p[0]
    # alpha = 0.1, n = 32: adapter 0 gets (1/32)**0.1 = 70.7%
    assert abs(common.popularity(32, 0.1)[0] - (1 / 32) ** 0.1) < 1e-12
    with pytest.raises(ValueError):
        common.popularity(4, 0.0)
    with pytest.raises(ValueError):
        common.popularity(0, 1.0)


def test_sampling_follows_popularity() -> None:
    rng = random.Random(0)
    p = common.popularity(4, 0.3)
    counts = [0] * 4
    for _ in range(20000):
        counts[common.sample_index(rng, p)] += 1
    for c, want in zip(counts, p, strict=True):
        assert abs(c / 20000 - want) < 0.02


def test_percentile_matches_linear_interpolation() -> None:
    xs = [float(i) for i in range(1, 101)]  # 1..100
    assert common.percentile(xs, 50) == pytest.approx(50.5)
    assert common.percentile(xs, 99) == pytest.approx(99.01)
    assert common.percentile(xs, 0) == 1 and common.percentile(xs, 100) == 100
    assert common.percentile([3.0], 99) == 3.0
    assert common.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)  # unsorted input
    s = common.summarize([0.1, 0.2, 0.3], scale=1e3)
    assert s["mean"] == pytest.approx(200) and s["p50"] == pytest.approx(200)
    assert s["max"] == pytest.approx(300) and s["n"] == 3


def test_tpot() -> None:
    assert common.tpot(latency=1.0, ttft=0.1, output_tokens=10) == pytest.approx(0.1)
    assert common.tpot(latency=1.0, ttft=0.1, output_tokens=1) is None


def test_summarize_run_counts_throughput_over_the_busy_window() -> None:
    r = [
        bench_serving.Result(
            0,
            "a",
            4,
            5,
            start=0.0,
            ttft=0.1,
            latency=0.5,
            output_tokens=5,
            itl=[0.1] * 4,
            status=200,
        ),
        bench_serving.Result(
            1,
            "a",
            4,
            5,
            start=0.5,
            ttft=0.2,
            latency=1.5,
            output_tokens=5,
            itl=[0.3] * 4,
            status=200,
        ),
        bench_serving.Result(2, "b", 4, 5, start=0.5, status=503, error="HTTP 503: x"),
    ]
    s = bench_serving.summarize_run(r)
    assert s["completed"] == 2 and s["errors"] == 1 and s["error_kinds"] == {"HTTP 503": 1}
    assert s["duration_s"] == pytest.approx(2.0)  # first start 0.0 .. last end 2.0
    assert s["output_throughput"] == pytest.approx(5.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(((0.4 / 4) + (1.3 / 4)) / 2 * 1e3)
    assert s["itl_ms"]["p50"] == pytest.approx(200)


def test_build_requests_is_seeded_and_in_range() -> None:
    kw: dict[str, Any] = dict(
        n=200,
        adapters=["a", "b", "c"],
        base_id="base",
        alpha=1.0,
        base_share=0.25,
        prompt_len=(3, 9),
        output_len=(2, 4),
        rate=50.0,
        alphabet=[1, 2, 3],
        seed=7,
    )
    a, b = bench_serving.build_requests(**kw), bench_serving.build_requests(**kw)
    assert a == b
    assert all(3 <= len(s.prompt_ids) <= 9 and 2 <= s.max_tokens <= 4 for s in a)
    arrivals = [s.arrival for s in a]
    assert arrivals == sorted(arrivals) and 2 < arrivals[-1] < 6  # ~200 / 50 req/s
    base = sum(s.model == "base" for s in a)
    assert 25 < base < 75
    closed = bench_serving.build_requests(**{**kw, "rate": None})
    assert all(s.arrival == 0 for s in closed)


def test_check_loopback() -> None:
    assert common.check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    for bad in ("http://example.com", "https://127.0.0.1:1", "http://0.0.0.0:80"):
        with pytest.raises(SystemExit):
            common.check_loopback(bad)


def test_soak_absence_windows() -> None:
    s = soak.Soak("http://127.0.0.1:1", None)
    s.absent["x"] = [[0.0, 1.0], [5.0, None]]
    assert s.was_absent("x", 0.5, 0.6) and s.was_absent("x", 0.9, 2.0)
    assert not s.was_absent("x", 1.5, 4.9)
    assert s.was_absent("x", 4.0, 5.1) and s.was_absent("x", 10.0, 11.0)


def test_soak_extracts_server_tracebacks() -> None:
    log = (
        "INFO: ok\nengine step failed\nTraceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    g()\nValueError: boom\nINFO: later\n'
    )
    (block,) = soak.tracebacks(log)
    assert block.startswith("engine step failed") and block.endswith("ValueError: boom")
    assert soak.tracebacks("INFO: nothing\n") == []


def test_synthetic_adapter_loads_in_hotlora(tmp_path: Path) -> None:
    from hotlora.adapters.format import BaseShapes, load_lora_adapter

    dims = common.base_dims(common.DEMO_MODEL)
    path = common.make_adapter(tmp_path / "x", dims, rank=4, seed=1)
    a = load_lora_adapter(
        path, name="x", base=BaseShapes.gpt2(dims.n_layer, dims.n_embd, dims.n_inner), max_rank=8
    )
    assert a.rank == 4 and len(a.modules) == 4 * dims.n_layer


# ---------------------------------------------------------------------------- bench_offline


def test_bench_offline_cpu_bf16_flags_and_note(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    assert bench_offline.cpu_bf16_flags(info) == {"avx512_bf16": False, "amx_bf16": True}
    none = bench_offline.cpu_bf16_flags(tmp_path / "missing")
    assert none == {"avx512_bf16": False, "amx_bf16": False}
    assert bench_offline.bf16_note(none, "bfloat16", cpu_runs=True) == bench_offline.BF16_NOTE
    assert bench_offline.bf16_note(none, "bfloat16", cpu_runs=False) is None
    assert bench_offline.bf16_note(none, "float32", cpu_runs=True) is None
    assert bench_offline.bf16_note({"amx_bf16": True}, "bfloat16", cpu_runs=True) is None


def test_bench_offline_base_shapes_from_config(tmp_path: Path) -> None:
    """One code path reads both families' adapter shapes from the saved config.json."""
    import transformers

    from hotlora.adapters.format import BaseShapes

    for name, expected in [
        ("smollm-135m", BaseShapes.llama(30, 576, 1536, 9, 3)),
        ("gpt2-small", BaseShapes.gpt2(12, 768)),
    ]:
        model = bench_offline.MODELS[name]
        kwargs = {**model.full, **model.fixed}
        getattr(transformers, model.config_cls)(**kwargs).save_pretrained(tmp_path / name)
        shapes = bench_offline.base_shapes(tmp_path / name)
        assert (shapes.n_layer, dict(shapes.dims), shapes.layout) == (
            expected.n_layer,
            dict(expected.dims),
            expected.layout,
        )
    assert shapes.d_ff == 3072 and bench_offline.base_shapes(tmp_path / "smollm-135m").d_ff == 1536


def _table_cells(out: str) -> list[list[str]]:
    """The data rows of the printed markdown tables, first column (distinct adapters) dropped."""
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "distinct" not in ln]
    return [[c.strip() for c in ln.strip("|").split("|")][1:] for ln in rows]


def test_bench_offline_smollm_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "offline.json"
    assert bench_offline.main(["--model", "smollm-135m", "--smoke", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cpu bf16: avx512_bf16" in printed and "model smollm-135m" in printed
    doc = json.loads(out.read_text())
    assert doc["model"] == "smollm-135m" and doc["shape"]["num_key_value_heads"] == 2
    assert set(doc["hotlora"]) == {"lora", "deu", "lora+deu"}
    for kind, tps in doc["hotlora"].items():
        assert set(tps) == {"0", "1", "8"} and all(v > 0 for v in tps.values()), kind
    assert set(doc["peft"]) == {"0", "1", "8"} and all(v > 0 for v in doc["peft"].values())
    cells = _table_cells(printed)
    assert len(cells) == 6  # 3 rows of the peft table, 3 of the per-kind table
    assert [len(r) for r in cells] == [4] * 3 + [6] * 3
    assert all(float(c.rstrip("x")) > 0 for r in cells for c in r)


# ---------------------------------------------------------------------------- end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Live:
    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> _Live:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def hotlora(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Live]:
    from hotlora.server.config import Settings
    from hotlora.server.main import create_app

    port = _free_port()
    settings = Settings(
        adapter_store=tmp_path_factory.mktemp("store"),
        port=port,
        seed_demo_adapters=False,
        max_running=8,
    )
    with _Live(create_app(settings), port) as live:
        yield live


def _bench(url: str, out: Path, name: str) -> dict[str, Any]:
    rc = bench_serving.main(
        [
            "--url",
            url,
            "-N",
            "2",
            "--num-requests",
            "6",
            "--concurrency",
            "3",
            "--rank",
            "4",
            "--prompt-len",
            "4:8",
            "--output-len",
            "3:5",
            "--warmup",
            "1",
            "--quiet",
            "--out-dir",
            str(out),
            "--name",
            name,
        ]
    )
    assert rc == 0
    doc: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    assert (out / f"{name}.png").stat().st_size > 1000
    return doc


def test_bench_serving_end_to_end_hotlora(hotlora: _Live, tmp_path: Path) -> None:
    import httpx

    doc = _bench(hotlora.url, tmp_path, "e2e")
    (run,) = doc["runs"]
    s = run["summary"]
    assert s["completed"] == 6 and s["errors"] == 0
    assert s["output_tokens"] == sum(r["max_tokens"] for r in run["requests"])
    assert s["ttft_ms"]["p99"] > 0 and s["output_throughput"] > 0
    assert {r["model"] for r in run["requests"]} <= {"bench-r4-0", "bench-r4-1"}
    ids = [m["id"] for m in httpx.get(f"{hotlora.url}/v1/models").json()["data"]]
    assert ids == ["hotlora-demo"]  # the bench deleted what it uploaded


def test_bench_serving_end_to_end_baseline(tmp_path: Path) -> None:
    """The baseline server answers the same API (same model dir, same synthetic adapters)."""
    port = _free_port()
    app = baseline_server.create_app(common.DEMO_MODEL, tmp_path / "store")
    with _Live(app, port) as live:
        doc = _bench(live.url, tmp_path, "e2e_baseline")
    s = doc["runs"][0]["summary"]
    assert s["completed"] == 6 and s["errors"] == 0
