"""Adapter scale: a store of 10,000 registered adapters, and the cold path disk -> device slot.

Parts (each a function below; --only picks some):
  store      builds the N-adapter store: one real upload through AdapterStore.put_dir, then N-1
             more names whose v1 shares its files (hard links of the immutable weights and
             config, each its own meta.json), every one a real, loadable adapter; then times
             AdapterStore(...) opening it in-process and the bytes its index holds;
  startup    `hotlora serve` -> /ready on the N-adapter store and on an empty one (the
             difference is what the store costs start-up);
  listing    GET /v1/models and GET /v1/adapters in full (p50/p99, cached and right after a
             change), and a paged walk (--page-size) checked to list every adapter once;
  upload     POST /v1/adapters of the demo-size adapter into the N-adapter store (p50/p99);
  rss        the server's RSS with the N-adapter store minus with the empty one;
  cold       in-process, the offline Engine + AdapterStore on a GPT-2-small-shaped random base:
             store.load (read + validate) -> CPU cache -> engine.load_adapter (slot copy) of
             rank-16 adapters, p50/p99 per phase and which dominates, with a short profile;
  throughput `hotlora serve` on the N-adapter store with its default slots and CPU cache: one
             seeded closed loop (--concurrency streamed clients, prompts 8-48 and outputs 16-64
             tokens, ignore_eos, greedy) sent to one adapter, then over all N with S-LoRA's
             power-law popularity for each alpha of --alphas (1 = uniform); output tok/s, the
             ratio to the one-adapter run, TTFT p99, adapter loads and evictions (/metrics);
             a fresh server per run (--smoke: one for all), and for reference the one-adapter
             run again with HOTLORA_MERGE_HOT_ADAPTERS=false (by default the server serves a
             dominant adapter from merged weights, which N = 1 always is);
  hotswap    on a server on the N-adapter store: uploads of a new version under one name,
             alternating the demo adapters reverse and upper, each followed at once by a
             streamed greedy completion of that name: 201 -> first token (p50/p99), the text
             checked to be the new version's, and the TTFT of the same request once resident.

    python load_tests/bench_scale.py                 # N = 10,000, every part (a few minutes)
    python load_tests/bench_scale.py --smoke         # CI: tiny sizes, < 30 s
    python load_tests/bench_scale.py --only cold --cold-loads 200
    python load_tests/bench_scale.py --only throughput,hotswap
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import bench_serving as bs
import common

DEMO_ADAPTER = common.REPO / "adapters" / "demo" / "adapters" / "reverse"
PARTS = ("store", "startup", "listing", "upload", "rss", "cold", "throughput", "hotswap")


@dataclass
class Row:
    """One line of the result table."""

    metric: str
    value: float | None  # None: not measured
    unit: str
    target: str = ""
    ok: bool | None = None  # None: no target, or not measured
    note: str = ""

    def cells(self) -> list[str]:
        if self.value is None:
            value = "-"
        elif self.unit == "count":
            value = f"{self.value:,.0f}"
        else:
            value = f"{self.value:,.1f} {self.unit}" if self.value >= 10 else (
                f"{self.value:,.2f} {self.unit}")
        met = {True: "yes", False: "NO", None: ""}[self.ok]
        return [self.metric, value, self.target, met, self.note]


def _ms(xs: Sequence[float]) -> tuple[float, float]:
    """p50 and p99 of seconds, in milliseconds."""
    return common.percentile(xs, 50) * 1e3, common.percentile(xs, 99) * 1e3


def _within(value: float, limit: float) -> bool:
    return not math.isnan(value) and value <= limit


# ---------------------------------------------------------------------------- the store


def base_shapes(model_dir: Path) -> Any:
    from hotlora.adapters.format import BaseShapes

    d = common.base_dims(model_dir)
    return BaseShapes.gpt2(d.n_layer, d.n_embd, d.n_inner)


def build_store(root: Path, model_dir: Path, n: int, src: Path, max_rank: int) -> float:
    """A store of n adapters scale-00000 ... (see the module docstring); returns seconds."""
    from hotlora.adapters.format import CONFIG_NAME, WEIGHTS_NAME
    from hotlora.adapters.store import META_NAME, AdapterStore

    t0 = time.perf_counter()
    store = AdapterStore(root, base_shapes(model_dir), max_rank)
    first, _ = store.put_dir(adapter_name(0), src)
    meta = (first.path / META_NAME).read_bytes()
    for i in range(1, n):
        vdir = root / adapter_name(i) / "v1"
        vdir.mkdir(parents=True)
        for f in (WEIGHTS_NAME, CONFIG_NAME):
            try:
                os.link(first.path / f, vdir / f)  # the store never rewrites a stored file
            except OSError:
                shutil.copyfile(first.path / f, vdir / f)
        (vdir / META_NAME).write_bytes(meta)
    return time.perf_counter() - t0


def adapter_name(i: int) -> str:
    return f"scale-{i:05d}"


def store_open(root: Path, model_dir: Path, max_rank: int, n: int) -> list[Row]:
    """AdapterStore(...) on the built store: open time, index bytes, lookups."""
    from hotlora.adapters.store import AdapterStore

    base = base_shapes(model_dir)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        store = AdapterStore(root, base, max_rank)
        times.append(time.perf_counter() - t0)
    listed = len(store.names())
    assert listed == n, f"expected {n} adapters, the store lists {listed}"
    tracemalloc.start()
    store = AdapterStore(root, base, max_rank)
    index_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    t0 = time.perf_counter()
    for i in range(0, n, max(1, n // 1000)):
        store.latest(adapter_name(i))
    lookups = max(1, len(range(0, n, max(1, n // 1000))))
    latest_us = (time.perf_counter() - t0) / lookups * 1e6
    best = min(times)
    rows = [
        Row(f"store open, {n:,} adapters (in-process)", best, "s", "<= 3 s", _within(best, 3.0),
            f"best of 3; {statistics.median(times):.2f} s median"),
        Row("store index memory per adapter", index_bytes / n, "B", note=(
            f"{index_bytes / 1e6:.1f} MB in all (tracemalloc)")),
        Row("store.latest(name)", latest_us, "us"),
    ]
    if hasattr(store, "page"):  # (a store from before pages: to measure the old code)
        t0 = time.perf_counter()
        store.page(adapter_name(n // 2), 100)
        rows.append(Row("store.page(after, 100)", (time.perf_counter() - t0) * 1e6, "us"))
    return rows


# ---------------------------------------------------------------------------- the server


def launch(model_dir: Path, store: Path, max_rank: int, **kw: Any) -> tuple[Any, float]:
    """A started hotlora server on `store` and the seconds from launch to /ready."""
    server = common.ServerProcess(
        "hotlora",
        model_dir,
        store=store,
        extra_args=["--max-rank", str(max_rank)],
        env={"HOTLORA_SEED_DEMO_ADAPTERS": "false", **kw.pop("env", {})},
        **kw,
    )
    t0 = time.perf_counter()
    server.start(poll_s=0.02)
    return server, time.perf_counter() - t0


def startup(t_full: float, t_empty: float, n: int) -> list[Row]:
    cost = t_full - t_empty
    return [
        Row(f"server start -> /ready, {n:,} adapters", t_full, "s"),
        Row("server start -> /ready, empty store", t_empty, "s"),
        Row("  start-up cost of the store", cost, "s", "<= 3 s", _within(cost, 3.0),
            "difference of the two (each the best of its launches)"),
    ]


def _timed_get(client: Any, url: str, params: dict[str, Any] | None = None) -> tuple[float, Any]:
    t0 = time.perf_counter()
    r = client.get(url, params=params, timeout=60)
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    return elapsed, r


def listing(url: str, n: int, requests: int, page_size: int, src: Path) -> list[Row]:
    """GET /v1/models and /v1/adapters: full (cached, and right after a change) and paged."""
    import httpx

    rows = []
    with httpx.Client() as client:
        full = [_timed_get(client, f"{url}/v1/models")[0] for _ in range(requests)]
        body = client.get(f"{url}/v1/models").json()
        assert len(body["data"]) == n + 1, f"{len(body['data'])} models listed, expected {n + 1}"
        p50, p99 = _ms(full)
        rows.append(Row(f"GET /v1/models, all {n + 1:,} (p50)", p50, "ms"))
        rows.append(Row(f"GET /v1/models, all {n + 1:,} (p99)", p99, "ms", "<= 100 ms",
                        _within(p99, 100), f"{len(full)} requests, {body_kb(client, url)} kB"))
        # Right after a change the listing is rendered again: an upload then a listing.
        changed = []
        for i in range(max(2, requests // 10)):
            common.upload_adapter(client, url, f"churn-{i}", src)
            changed.append(_timed_get(client, f"{url}/v1/models")[0])
            client.delete(f"{url}/v1/adapters/churn-{i}", timeout=60)
        p50, p99 = _ms(changed)
        rows.append(Row("GET /v1/models right after an upload (p99)", p99, "ms", "<= 100 ms",
                        _within(p99, 100), f"p50 {p50:.1f} ms, {len(changed)} changes"))
        pages, seen, after = [], [], None
        while True:
            params = {"limit": page_size} | ({"after": after} if after else {})
            elapsed, r = _timed_get(client, f"{url}/v1/models", params)
            pages.append(elapsed)
            page = r.json()
            seen += [m["id"] for m in page["data"]]
            if not page.get("has_more"):  # (a server without pages: one page of everything)
                break
            after = page["last_id"]
        assert seen == [m["id"] for m in body["data"]], "the paged walk differs from the listing"
        p50, p99 = _ms(pages)
        rows.append(Row(f"GET /v1/models?limit={page_size} (p99)", p99, "ms", "<= 100 ms",
                        _within(p99, 100), f"p50 {p50:.1f} ms; {len(pages)} pages, each "
                        "adapter once"))
        adapters = [_timed_get(client, f"{url}/v1/adapters")[0] for _ in range(requests)]
        p50, p99 = _ms(adapters)
        rows.append(Row(f"GET /v1/adapters, all {n:,} (p99)", p99, "ms", "<= 100 ms",
                        _within(p99, 100), f"p50 {p50:.1f} ms"))
    return rows


def body_kb(client: Any, url: str) -> int:
    return len(client.get(f"{url}/v1/models").content) // 1000


def upload(url: str, src: Path, count: int) -> list[Row]:
    """POST /v1/adapters of the demo-size adapter under fresh names (201 = stored, durable)."""
    import httpx

    times = []
    with httpx.Client() as client:
        for i in range(count):
            t0 = time.perf_counter()
            common.upload_adapter(client, url, f"upload-{i}", src)
            times.append(time.perf_counter() - t0)
        for i in range(count):
            client.delete(f"{url}/v1/adapters/upload-{i}", timeout=60)
    p50, p99 = _ms(times)
    size_kb = (src / "adapter_model.safetensors").stat().st_size // 1000
    return [
        Row(f"upload {size_kb} kB adapter (p50)", p50, "ms", "<= 20 ms", _within(p50, 20),
            f"{count} uploads"),
        Row(f"upload {size_kb} kB adapter (p99)", p99, "ms"),
    ]


def rss(full: int, empty: int, n: int) -> list[Row]:
    return [
        Row(f"server RSS, {n:,} adapters", full / 2**20, "MiB"),
        Row("server RSS, empty store", empty / 2**20, "MiB"),
        Row("  RSS the store adds", (full - empty) / 2**20, "MiB",
            "index + listing cache", None, "no adapter is loaded: the CPU cache is empty"),
    ]


# ---------------------------------------------------------------------------- cold load


def cold_load(work: Path, base_kind: str, rank: int, loads: int, distinct: int) -> list[Row]:
    """store.load -> cache.put -> engine.load_adapter, each load a cache miss (a new key)."""
    from hotlora.adapters.cache import ByteLRU
    from hotlora.adapters.store import AdapterStore
    from hotlora.server.engine import Engine, EngineConfig

    model_dir = work / f"base-{base_kind}"
    if not (model_dir / "config.json").exists():
        common.make_random_base(model_dir, base_kind)
    slots = 8
    engine = Engine.from_pretrained(
        model_dir, EngineConfig(max_batch=1, max_seq_len=64, max_adapters=slots, max_rank=rank)
    )
    store = AdapterStore(work / "cold-store", engine.base_shapes, rank)
    dims = common.base_dims(model_dir)
    versions = []
    for i in range(distinct):  # distinct files: every load reads its own bytes
        src = work / "cold-src" / f"a{i}"
        if not src.exists():
            common.make_adapter(src, dims, rank=rank, seed=i)
        versions.append(store.latest(f"cold-{i}") or store.put_dir(f"cold-{i}", src)[0])
    cache: Any = ByteLRU(1 << 30)
    phases: dict[str, list[float]] = {k: [] for k in ("read", "cache", "evict", "slot", "total")}

    def one(i: int) -> None:
        v = versions[i % distinct]
        key = f"{v.key}#{i}"
        t0 = time.perf_counter()
        adapter = store.load(v)  # disk (page cache) -> CPU: read + validate
        t1 = time.perf_counter()
        cache.put(key, adapter, adapter.size_bytes)
        t2 = time.perf_counter()
        if engine.free_slots == 0:
            engine.remove_adapter(engine.idle_adapters()[0])
        t3 = time.perf_counter()
        engine.load_adapter(key, adapter)  # CPU -> device slot
        t4 = time.perf_counter()
        for k, a, b in (("read", t0, t1), ("cache", t1, t2), ("evict", t2, t3),
                        ("slot", t3, t4), ("total", t0, t4)):
            phases[k].append(b - a)

    for i in range(min(5, loads)):  # warm-up: allocator, page cache, first-touch of slots
        one(-1 - i)
    for k in phases:
        phases[k].clear()
    for i in range(loads):
        one(i)
    prof = cProfile.Profile()
    prof.enable()
    for i in range(min(loads, 30)):
        one(loads + i)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(8)
    lines = out.getvalue().splitlines()
    profile = "\n".join(x for x in lines if x.strip() and "function calls" not in x)
    size_mb = versions[0].size_bytes / 1e6
    medians = {k: statistics.median(v) * 1e3 for k, v in phases.items() if k != "total"}
    dominant = max(medians, key=lambda k: medians[k])
    rows = []
    for k, label in (("read", "  store.load (read + validate)"), ("cache", "  cache.put"),
                     ("evict", "  evict an idle slot"), ("slot", "  engine.load_adapter (copy)")):
        p50, p99 = _ms(phases[k])
        rows.append(Row(label, p50, "ms", note=f"p99 {p99:.2f} ms"))
    p50, p99 = _ms(phases["total"])
    head = [
        Row(f"cold load {base_kind} rank {rank}, {size_mb:.1f} MB (p50)", p50, "ms"),
        Row(f"cold load {base_kind} rank {rank} (p99)", p99, "ms", "<= 20 ms",
            _within(p99, 20), f"{loads} loads on {engine.device}; dominant: {dominant}"),
    ]
    print(f"\ncold-load profile ({min(loads, 30)} loads, by own time):\n{profile}\n", flush=True)
    return head + rows


# ---------------------------------------------------------------------------- served


SWAP_FILES = (DEMO_ADAPTER, common.REPO / "adapters" / "demo" / "adapters" / "upper")


def _counters(url: str) -> dict[str, float]:
    """bench_serving's counters and the evictions by tier (device | cpu)."""
    import httpx

    out = bs.server_metrics(url)
    if out:
        m = common.parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)
        out.update({k: v for k, v in m.items() if k.startswith("hotlora_adapter_evictions_total{")})
    return out


def _by_tier(delta: dict[str, float], name: str) -> dict[str, int]:
    """A counter's increase summed by its tier label: {"disk": 12, "cpu": 3, ...}."""
    tiers: dict[str, int] = {}
    for k, v in delta.items():
        if k.startswith(name + "{") and 'tier="' in k:
            tier = k.split('tier="', 1)[1].split('"', 1)[0]
            tiers[tier] = tiers.get(tier, 0) + round(v)
    return tiers


def _tiers(tiers: dict[str, int]) -> str:
    """'12 (disk 9, cpu 3)': the total and the tiers that counted any."""
    parts = [f"{k} {v:,}" for k, v in sorted(tiers.items()) if v]
    return f"{sum(tiers.values()):,}" + (f" ({', '.join(parts)})" if parts else "")


UNMERGED = "N=1, merging off"


def throughput_power_law(
    args: argparse.Namespace, store: Path, url: str | None = None
) -> list[Row]:
    """Output tok/s of one seeded closed-loop workload (--concurrency streamed clients, prompts
    8-48, outputs 16-64 tokens, ignore_eos, greedy) sent once to one adapter and then over all
    N adapters of `store` with S-LoRA's power-law popularity, alpha in --alphas (1 = uniform);
    the server keeps its default slot count and CPU cache. Each run gets a fresh server (cold
    caches, nothing left from the previous run) unless `url` is given (smoke: one server)."""
    import asyncio

    import httpx

    n = args.num_adapters
    names = [adapter_name(i) for i in range(n)]
    alphabet = bs.prompt_alphabet(args.model_dir)
    runs: list[tuple[str, list[str], float]] = [("N=1", names[:1], 1.0)]
    if url is None:  # for reference: one adapter as LoRA rows, as the N-adapter runs serve it
        runs.append((UNMERGED, names[:1], 1.0))
    runs += [(f"N={n:,} alpha={a:g}", names, a) for a in args.alphas]
    results: dict[str, dict[str, Any]] = {}
    for label, adapters, alpha in runs:
        server = None
        if url is None:
            env = {"HOTLORA_MERGE_HOT_ADAPTERS": "false"} if label == UNMERGED else {}
            server, _ = launch(args.model_dir, store, args.max_rank, env=env)
        target = url or server.url  # type: ignore[union-attr]
        try:
            with httpx.Client() as client:
                base_id = common.base_model_id(client, target)
            common_kw: dict[str, Any] = dict(
                base_id=base_id, base_share=0.0, prompt_len=(8, 48), rate=None, alphabet=alphabet
            )
            # Warm-up (untimed): one wave of short requests to the base and one to the first
            # adapter, so the first timed steps pay no first-call costs; no other adapter loads.
            warm = bs.build_requests(n=args.concurrency, adapters=[], alpha=1.0,
                                     output_len=(2, 4), seed=1, **common_kw)
            warm.append(bs.RequestSpec(len(warm), 0.0, adapters[0], warm[0].prompt_ids, 2))
            asyncio.run(bs.run_load(target, warm, concurrency=args.concurrency, progress=False))
            specs = bs.build_requests(n=args.throughput_requests, adapters=adapters, alpha=alpha,
                                      output_len=(16, 64), seed=args.seed, **common_kw)
            before = _counters(target)
            res, _ = asyncio.run(bs.run_load(target, specs, concurrency=args.concurrency,
                                             temperature=0.0, label=f"{label} ",
                                             progress=not args.smoke))
            summary = bs.summarize_run(res)
            delta = bs.metrics_delta(before, _counters(target))
        finally:
            if server is not None:
                server.cleanup()
        if summary["errors"]:
            raise RuntimeError(f"{label}: {summary['errors']} failed requests: "
                               f"{summary['first_errors'][:2]}")
        summary["distinct_adapters"] = len({s.model for s in specs})
        summary["delta"] = delta
        results[label] = summary
        bs.print_summary(label, summary)
    one = results["N=1"]["output_throughput"]
    rows = []
    for label, s in results.items():
        d = s["delta"]
        loads, evictions = _by_tier(d, "hotlora_adapter_loads_total"), _by_tier(
            d, "hotlora_adapter_evictions_total")
        note = (f"TTFT p99 {s['ttft_ms']['p99']:.0f} ms; decode batch "
                f"{d.get('mean_decode_batch', math.nan):.1f} rows; adapters used "
                f"{s['distinct_adapters']:,}, loaded {_tiers(loads)}, evicted "
                f"{_tiers(evictions)}; merges {d.get('hotlora_adapter_merges_total', 0):.0f}")
        rows.append(Row(f"output tok/s, {label}", s["output_throughput"], "tok/s", note=note))
        if label == UNMERGED:
            rows.append(Row("  merging off / N=1", s["output_throughput"] / one * 100, "%",
                            note="what merging the one hot adapter gains the N=1 run"))
        elif label != "N=1":
            ratio = s["output_throughput"] / one * 100
            rows.append(Row(f"  {label.split()[-1]} / N=1", ratio, "%", ">= 80%",
                            ratio >= 80, f"{s['requests']} requests each, concurrency "
                            f"{args.concurrency}"))
    return rows


def _stream(client: Any, url: str, model: str, prompt: str, t0: float) -> tuple[float, str]:
    """A greedy streamed completion: (seconds from t0 to its first token, its whole text)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0.0,
            "stream": True}
    first, text = None, []
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {r.status_code} {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(f"{model}: {obj['error']}")
            if obj.get("choices"):
                first = first or time.perf_counter() - t0
                text.append(obj["choices"][0].get("text") or "")
    if first is None:
        raise RuntimeError(f"{model}: no token streamed")
    return first, "".join(text)


def hot_swap_latency(args: argparse.Namespace, url: str) -> list[Row]:
    """POST /v1/adapters of a new version under one name, alternating two demo adapters' files
    (reverse, upper), and at once a streamed greedy completion of that name: the time from
    the 201 to its first token, and its text checked to be the new version's; then the same
    request again (the version now resident) for the plain TTFT."""
    import httpx

    from hotlora.adapters.demo_tasks import prompt_for

    prompt, name = prompt_for("hello"), "hotswap"
    swaps, plain, uploads = [], [], []
    with httpx.Client() as client:
        refs = {}
        for src in SWAP_FILES:  # each file's greedy text, from its own name
            common.upload_adapter(client, url, f"hotswap-ref-{src.name}", src)
            refs[src] = _stream(client, url, f"hotswap-ref-{src.name}", prompt,
                                time.perf_counter())[1]
        texts = {src.name: text for src, text in refs.items()}
        if len(set(texts.values())) < len(texts):
            raise RuntimeError(f"the two adapters answer alike: {texts}")
        print(f"hot swap: {prompt!r} -> {texts}", flush=True)
        common.upload_adapter(client, url, name, SWAP_FILES[1])  # v1, made resident
        _stream(client, url, name, prompt, time.perf_counter())
        for i in range(args.swaps):
            src = SWAP_FILES[i % 2]
            t0 = time.perf_counter()
            version = common.upload_adapter(client, url, name, src)["version"]
            t201 = time.perf_counter()
            first, text = _stream(client, url, name, prompt, t201)
            if text != refs[src]:
                raise RuntimeError(f"swap {i} to v{version} ({src.name}): got {text!r}, "
                                   f"expected {refs[src]!r}")
            swaps.append(first)
            uploads.append(t201 - t0)
            plain.append(_stream(client, url, name, prompt, time.perf_counter())[0])
        for n in (name, *(f"hotswap-ref-{s.name}" for s in SWAP_FILES)):
            client.delete(f"{url}/v1/adapters/{n}", timeout=60)
    p50, p99 = _ms(swaps)
    plain50, plain99 = _ms(plain)
    return [
        Row("hot swap: 201 -> first token (p50)", p50, "ms"),
        Row("hot swap: 201 -> first token (p99)", p99, "ms", "<= 50 ms", _within(p99, 50),
            f"{len(swaps)} swaps reverse <-> upper, each answer the new version's "
            f"({' / '.join(repr(t.strip()) for t in texts.values())}); upload p50 "
            f"{_ms(uploads)[0]:.1f} ms"),
        Row("  TTFT, same adapter resident (p50)", plain50, "ms", note=f"p99 {plain99:.1f} ms"),
    ]


# ---------------------------------------------------------------------------- main


def print_table(rows: Sequence[Row]) -> None:
    head = ["metric", "value", "target", "met", "note"]
    cells = [head] + [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head) - 1)]
    for c in cells:
        print("  ".join(x.ljust(w) for x, w in zip(c, widths, strict=False)) + "  " + c[-1])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI: checks it runs)")
    ap.add_argument("-N", "--num-adapters", type=int, default=10_000)
    ap.add_argument("--model-dir", type=Path, default=common.DEMO_MODEL)
    ap.add_argument("--adapter", type=Path, default=DEMO_ADAPTER,
                    help="the adapter every stored one copies and every upload sends")
    ap.add_argument("--max-rank", type=int, default=16)
    ap.add_argument("--requests", type=int, default=50, help="listing requests per kind")
    ap.add_argument("--page-size", type=int, default=100)
    ap.add_argument("--uploads", type=int, default=40)
    ap.add_argument("--startups", type=int, default=2, help="server launches per store (best)")
    ap.add_argument("--cold-base", default="gpt2-small", choices=sorted(common.RANDOM_BASES))
    ap.add_argument("--cold-rank", type=int, default=16)
    ap.add_argument("--cold-loads", type=int, default=100)
    ap.add_argument("--throughput-requests", type=int, default=1000, help="requests per run")
    ap.add_argument("--concurrency", type=int, default=32, help="throughput's clients")
    ap.add_argument("--alphas", type=lambda t: [float(x) for x in t.split(",")],
                    default=[1.0, 0.5, 0.1], help="popularity exponents (comma-separated)")
    ap.add_argument("--seed", type=int, default=0, help="throughput's workload")
    ap.add_argument("--swaps", type=int, default=20, help="hot swaps timed")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated: {','.join(PARTS)}")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where stores and bases go (default: a temporary directory)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.num_adapters = min(args.num_adapters, 200)
        args.requests, args.uploads, args.page_size, args.startups = 5, 3, 64, 1
        args.cold_base, args.cold_rank, args.cold_loads = "tiny", 8, 10
        args.throughput_requests, args.swaps = 16, 4
    parts = set(args.only.split(","))
    unknown = parts - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    print(json.dumps({"machine": common.machine_info(), "n": args.num_adapters}), flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="bench-scale-")
    work = args.work_dir or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    n = args.num_adapters
    try:
        rows += run_store_and_server(args, parts, work, n)
        if "cold" in parts:
            rows += cold_load(work, args.cold_base, args.cold_rank, args.cold_loads, distinct=8)
        rows += run_served(args, parts, work, n)
    finally:
        tmp.cleanup()
    print()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


def ensure_store(args: argparse.Namespace, work: Path, n: int) -> Path:
    """work/store-full: built (afresh) by the first part that needs it in this run."""
    full_store = work / "store-full"
    if not getattr(args, "store_built", False):
        if full_store.exists():
            shutil.rmtree(full_store)
        secs = build_store(full_store, args.model_dir, n, args.adapter, args.max_rank)
        print(f"built a store of {n:,} adapters in {secs:.1f} s", flush=True)
        args.store_built = True
    return full_store


def run_served(args: argparse.Namespace, parts: set[str], work: Path, n: int) -> list[Row]:
    """throughput (a server per run) and hotswap (its own server), both on the N-adapter
    store; --smoke: one server for both."""
    if not parts & {"throughput", "hotswap"}:
        return []
    store = ensure_store(args, work, n)
    rows: list[Row] = []
    server = None
    try:
        if args.smoke:
            server, _ = launch(args.model_dir, store, args.max_rank)
        if "throughput" in parts:
            rows += throughput_power_law(args, store, server.url if server else None)
        if "hotswap" in parts:
            if server is None:
                server, _ = launch(args.model_dir, store, args.max_rank)
            rows += hot_swap_latency(args, server.url)
    finally:
        if server is not None:
            server.cleanup()
    return rows


def run_store_and_server(
    args: argparse.Namespace, parts: set[str], work: Path, n: int
) -> list[Row]:
    """The parts that need the N-adapter store (and, but for `store`, a server on it)."""
    rows: list[Row] = []
    if not parts & {"store", "startup", "listing", "upload", "rss"}:
        return rows
    full_store = ensure_store(args, work, n)
    if "store" in parts:
        rows += store_open(full_store, args.model_dir, args.max_rank, n)
    if not parts & {"startup", "listing", "upload", "rss"}:
        return rows
    import httpx

    empty_store = work / "store-empty"
    shutil.rmtree(empty_store, ignore_errors=True)
    # Alternating launches, the best of each: the first launch also pays for a cold file cache.
    t_empty = t_full = math.inf
    for _ in range(args.startups - 1):
        for store in (empty_store, full_store):
            server, t = launch(args.model_dir, store, args.max_rank)
            server.cleanup()
            if store == empty_store:
                t_empty = min(t_empty, t)
            else:
                t_full = min(t_full, t)
    server, t = launch(args.model_dir, empty_store, args.max_rank)
    t_empty = min(t_empty, t)
    try:
        for _ in range(3):  # what the full server does before its RSS is read, but listings
            httpx.get(f"{server.url}/v1/models", timeout=60).raise_for_status()
        rss_empty = common.rss_bytes(server.pid)
    finally:
        server.cleanup()
    server, t = launch(args.model_dir, full_store, args.max_rank)
    t_full = min(t_full, t)
    try:
        if "startup" in parts:
            rows += startup(t_full, t_empty, n)
        if "listing" in parts:
            rows += listing(server.url, n, args.requests, args.page_size, args.adapter)
        rss_full = common.rss_bytes(server.pid)  # after listings: their cache is counted
        if "upload" in parts:
            rows += upload(server.url, args.adapter, args.uploads)
        if "rss" in parts:
            rows += rss(rss_full, rss_empty, n)
    finally:
        server.cleanup()
    return rows


if __name__ == "__main__":
    sys.exit(main())
