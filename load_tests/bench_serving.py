"""Online serving benchmark: many adapters over hotlora's OpenAI API (or the baseline's).

What it does, in order:
  1. writes N random PEFT LoRA adapters of --rank shaped for --model-dir (its config.json) and
     uploads the missing ones as bench-r<rank>-<i> through POST /v1/adapters;
  2. draws --num-requests requests (seeded): adapter i with probability
     p_i = ((i+1)/N)**alpha - (i/N)**alpha (S-LoRA's power law: alpha=1 uniform, smaller alpha
     more skewed towards adapter 0), --base-share of them to the base model instead, prompt and
     output lengths uniform over --prompt-len / --output-len (token ids; ignore_eos so every
     request produces exactly its output length);
  3. sends them streamed (SSE): Poisson arrivals at --rate req/s, at most --concurrency in flight
     (no --rate = closed loop: --concurrency clients back to back);
  4. reports request throughput, output tokens/s, TTFT, TPOT = (latency - TTFT)/(tokens - 1),
     inter-token latency (gap between streamed chunks) and E2E latency (mean, p50, p90, p99),
     and errors; writes <out-dir>/<name>.json and <name>.png.

Targets: --url http://127.0.0.1:PORT (a running server), or --launch hotlora|baseline (a
subprocess on a free loopback port with --model-dir, stopped at the end), or --compare (both,
one after the other, same requests, one table of ratios). --sweep repeats the run for every N
in --sweep-n and plots throughput and p99 TTFT against N.

    python load_tests/bench_serving.py --launch hotlora --num-adapters 32
    python load_tests/bench_serving.py --compare --num-adapters 32 --concurrency 32
    python load_tests/bench_serving.py --launch hotlora --sweep --sweep-n 1,8,32,128
    python load_tests/bench_serving.py --url http://127.0.0.1:8000 --rate 20 --num-requests 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import common

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class RequestSpec:
    index: int
    arrival: float  # seconds after the run starts (0 for closed loop)
    model: str  # adapter name or the base model's id
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class Result:
    index: int
    model: str
    prompt_len: int
    max_tokens: int
    start: float = 0.0  # seconds after the run starts
    ttft: float | None = None
    latency: float | None = None
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # chunk arrivals, run-relative
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# ---------------------------------------------------------------------------- workload


def prompt_alphabet(model_dir: Path) -> list[int]:
    """Token ids of the letters a-z in the served tokenizer (any id below 256 as a fallback)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = [tok.token_to_id(c) for c in "abcdefghijklmnopqrstuvwxyz"]
    good = sorted({i for i in ids if i is not None})
    return good or list(range(min(256, tok.get_vocab_size())))


def build_requests(
    *,
    n: int,
    adapters: Sequence[str],
    base_id: str,
    alpha: float,
    base_share: float,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    rate: float | None,
    alphabet: Sequence[int],
    seed: int,
) -> list[RequestSpec]:
    """The seeded request list: arrivals, adapters (power law), prompt and output lengths."""
    rng = random.Random(seed)
    probs = common.popularity(len(adapters), alpha) if adapters else []
    t, specs = 0.0, []
    for i in range(n):
        if rate is not None and math.isfinite(rate):
            t += rng.expovariate(rate)
        if not adapters or rng.random() < base_share:
            model = base_id
        else:
            model = adapters[common.sample_index(rng, probs)]
        plen = rng.randint(*prompt_len)
        ids = [rng.choice(alphabet) for _ in range(plen)]
        specs.append(
            RequestSpec(i, t if rate is not None else 0.0, model, ids, rng.randint(*output_len))
        )
    return specs


# ---------------------------------------------------------------------------- client


def _payload(spec: RequestSpec, temperature: float) -> dict[str, Any]:
    """The completion request both send paths make: exact output lengths via ignore_eos."""
    return {
        "model": spec.model,
        "prompt": spec.prompt_ids,
        "max_tokens": spec.max_tokens,
        "temperature": temperature,
        "seed": spec.index,
        "ignore_eos": True,
    }


async def send(
    client: Any,
    url: str,
    spec: RequestSpec,
    t0: float,
    *,
    temperature: float,
    headers: dict[str, str],
    stream: bool = True,
) -> Result:
    """One streamed completion; every failure mode lands in Result.error."""
    if not stream:
        return await send_plain(client, url, spec, t0, temperature=temperature, headers=headers)
    res = Result(spec.index, spec.model, len(spec.prompt_ids), spec.max_tokens)
    payload = {
        **_payload(spec, temperature),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    res.start = start - t0
    last: float | None = None
    done = False
    finish = None
    try:
        async with client.stream(
            "POST", f"{url}/v1/completions", json=payload, headers=headers
        ) as r:
            res.status = r.status_code
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                res.error = f"HTTP {r.status_code}: {body[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = f"error event: {obj['error'].get('message', obj)}"
                    continue
                if obj.get("choices"):
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - start
                    elif last is not None:
                        res.itl.append(now - last)
                    last = now
                    res.token_times.append(now - t0)
                    finish = obj["choices"][0].get("finish_reason") or finish
                if obj.get("usage"):
                    res.output_tokens = int(obj["usage"]["completion_tokens"])
    except Exception as e:  # timeouts, connection errors, bad JSON: all count as errors
        res.error = f"{type(e).__name__}: {e}"[:200]
        return res
    res.latency = time.perf_counter() - start
    if res.error is None and not done:
        res.error = "stream ended without [DONE]"
    elif res.error is None and finish is None:
        res.error = "no finish_reason"
    elif res.error is None and res.output_tokens != spec.max_tokens:
        res.error = f"got {res.output_tokens} of {spec.max_tokens} tokens"
    return res


async def send_plain(
    client: Any,
    url: str,
    spec: RequestSpec,
    t0: float,
    *,
    temperature: float,
    headers: dict[str, str],
) -> Result:
    """One non-streamed completion (no TTFT, TPOT or ITL: only latency and tokens)."""
    res = Result(spec.index, spec.model, len(spec.prompt_ids), spec.max_tokens)
    payload = _payload(spec, temperature)
    start = time.perf_counter()
    res.start = start - t0
    try:
        r = await client.post(f"{url}/v1/completions", json=payload, headers=headers)
        res.status = r.status_code
        if r.status_code != 200:
            res.error = f"HTTP {r.status_code}: {r.text[:200]}"
            return res
        body = r.json()
        res.output_tokens = int(body["usage"]["completion_tokens"])
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
        return res
    res.latency = time.perf_counter() - start
    res.token_times = [res.start + res.latency] * res.output_tokens
    if res.output_tokens != spec.max_tokens:
        res.error = f"got {res.output_tokens} of {spec.max_tokens} tokens"
    return res


async def run_load(
    url: str,
    specs: Sequence[RequestSpec],
    *,
    concurrency: int | None,
    temperature: float = 0.0,
    headers: dict[str, str] | None = None,
    timeout: float = 120.0,
    max_duration: float = 600.0,
    label: str = "",
    progress: bool = True,
    stream: bool = True,
) -> tuple[list[Result], float]:
    """Send every spec (at its arrival time, at most `concurrency` in flight); results + wall s."""
    import httpx

    headers = headers or {}
    limit = concurrency or len(specs) or 1
    sem = asyncio.Semaphore(limit)
    results: list[Result] = []
    counts = {"sent": 0, "done": 0, "errors": 0, "tokens": 0}
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        t0 = time.perf_counter()

        async def one(spec: RequestSpec) -> None:
            delay = spec.arrival - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            async with sem:
                counts["sent"] += 1
                res = await send(
                    client, url, spec, t0, temperature=temperature, headers=headers, stream=stream
                )
            results.append(res)
            counts["done"] += 1
            counts["errors"] += not res.ok
            counts["tokens"] += res.output_tokens

        async def report() -> None:
            prev_t, prev_tok = 0.0, 0
            while True:
                await asyncio.sleep(1.0)
                now = time.perf_counter() - t0
                rate = (counts["tokens"] - prev_tok) / max(now - prev_t, 1e-9)
                prev_t, prev_tok = now, counts["tokens"]
                print(
                    f"{label}[{now:6.1f}s] sent {counts['sent']}/{len(specs)}  "
                    f"done {counts['done']}  in flight {counts['sent'] - counts['done']}  "
                    f"errors {counts['errors']}  out tok/s {rate:8.1f}",
                    flush=True,
                )

        reporter = asyncio.create_task(report()) if progress else None
        tasks = [asyncio.create_task(one(s)) for s in specs]
        _, pending = await asyncio.wait(tasks, timeout=max_duration)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
        if reporter is not None:
            reporter.cancel()
    seen = {r.index for r in results}
    for s in specs:
        if s.index not in seen:
            results.append(
                Result(
                    s.index,
                    s.model,
                    len(s.prompt_ids),
                    s.max_tokens,
                    error=f"not finished within --max-duration {max_duration} s",
                )
            )
    results.sort(key=lambda r: r.index)
    return results, wall


# ---------------------------------------------------------------------------- statistics


def summarize_run(results: Sequence[Result]) -> dict[str, Any]:
    """Throughput over the busy window (first send to last response) and latency stats in ms."""
    ok = [r for r in results if r.ok]
    ends = [r.start + r.latency for r in results if r.latency is not None]
    starts = [r.start for r in results if r.status is not None or r.latency is not None]
    window = (max(ends) - min(starts)) if ends and starts else math.nan
    tokens = sum(r.output_tokens for r in ok)
    tpots = [
        t
        for r in ok
        if r.ttft is not None and r.latency is not None
        if (t := common.tpot(r.latency, r.ttft, r.output_tokens)) is not None
    ]
    errors = Counter((r.error or "").split(":")[0] for r in results if not r.ok)
    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": dict(errors),
        "first_errors": [r.error for r in results if not r.ok][:5],
        "duration_s": window,
        "request_throughput": len(ok) / window if window and window > 0 else math.nan,
        "output_throughput": tokens / window if window and window > 0 else math.nan,
        "output_tokens": tokens,
        "ttft_ms": common.summarize([r.ttft for r in ok if r.ttft is not None], 1e3),
        "tpot_ms": common.summarize(tpots, 1e3),
        "itl_ms": common.summarize([x for r in ok for x in r.itl], 1e3),
        "e2e_ms": common.summarize([r.latency for r in ok if r.latency is not None], 1e3),
    }


def series_bin(results: Sequence[Result]) -> float:
    """A bin width giving about 40 bins over the run (0.1 s to 5 s)."""
    last = max((t for r in results for t in r.token_times), default=1.0)
    return min(5.0, max(0.1, round(last / 40, 1)))


def throughput_series(results: Sequence[Result], bin_s: float = 1.0) -> list[float]:
    """Streamed chunks (= output tokens, unless some decode to no text) per second over the
    run, in bins of bin_s seconds."""
    times = [t for r in results for t in r.token_times]
    if not times:
        return []
    bins = [0.0] * (int(max(times) / bin_s) + 1)
    for t in times:
        bins[int(t / bin_s)] += 1 / bin_s
    return bins


def format_row(label: str, s: dict[str, Any]) -> str:
    return (
        f"| {label} | {s['completed']}/{s['requests']} | {s['request_throughput']:.2f} | "
        f"{s['output_throughput']:.1f} | {s['ttft_ms']['p50']:.0f} | {s['ttft_ms']['p99']:.0f} | "
        f"{s['tpot_ms']['mean']:.1f} | {s['tpot_ms']['p99']:.1f} | {s['itl_ms']['p50']:.1f} | "
        f"{s['itl_ms']['p99']:.1f} | {s['errors']} |"
    )


TABLE_HEAD = (
    "| run | ok | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | TPOT mean ms | TPOT p99 ms "
    "| ITL p50 ms | ITL p99 ms | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def print_summary(label: str, s: dict[str, Any]) -> None:
    print(
        f"\n{label}: {s['completed']}/{s['requests']} ok in {s['duration_s']:.1f} s, "
        f"{s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output tok/s"
    )
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        v = s[key]
        print(
            f"  {key[:-3].upper():>5} ms  mean {v['mean']:8.1f}  p50 {v['p50']:8.1f}  "
            f"p90 {v['p90']:8.1f}  p99 {v['p99']:8.1f}"
        )
    if "server_cpu_s" in s:
        print(
            f"  CPU s during the run: server {s['server_cpu_s']:.1f}, "
            f"load generator {s['client_cpu_s']:.1f} (wall {s['duration_s']:.1f})"
        )
    if s["errors"]:
        print(f"  errors: {s['error_kinds']}; first: {s['first_errors'][:2]}")


# ---------------------------------------------------------------------------- plots


def plot_runs(runs: dict[str, list[Result]], path: Path, title: str) -> None:
    """TTFT and ITL CDFs and output tokens/s over time, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, results in runs.items():
        ok = [r for r in results if r.ok]
        for ax, values in (
            (axes[0], sorted(r.ttft * 1e3 for r in ok if r.ttft is not None)),
            (axes[1], sorted(x * 1e3 for r in ok for x in r.itl)),
        ):
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label)
        width = series_bin(results)
        series = throughput_series(results, width)
        axes[2].plot([(i + 0.5) * width for i in range(len(series))], series, label=label)
    axes[0].set(xlabel="TTFT (ms)", ylabel="CDF", title="time to first token", xscale="log")
    axes[1].set(
        xlabel="inter-token latency (ms)", ylabel="CDF", title="inter-token latency", xscale="log"
    )
    axes[2].set(xlabel="time (s)", ylabel="output tokens/s", title="throughput over time")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_sweep(points: dict[str, list[tuple[int, dict[str, Any]]]], path: Path, title: str) -> None:
    """Output tokens/s and p99 TTFT against the number of adapters, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    ns_all = sorted({n for pts in points.values() for n, _ in pts})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, pts in points.items():
        ns = [n for n, _ in pts]
        axes[0].plot(ns, [s["output_throughput"] for _, s in pts], "o-", label=label)
        axes[1].plot(ns, [s["ttft_ms"]["p99"] for _, s in pts], "o-", label=label)
    axes[0].set(xlabel="adapters (N)", ylabel="output tokens/s", title="throughput", xscale="log")
    axes[1].set(
        xlabel="adapters (N)", ylabel="p99 TTFT (ms)", title="p99 TTFT", xscale="log", yscale="log"
    )
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(ns_all, [str(n) for n in ns_all])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------- setup


class AdapterFactory:
    """Synthetic adapters written once per (rank, index) into a temporary directory."""

    def __init__(self, model_dir: Path, rank: int) -> None:
        self.dims, self.rank = common.base_dims(model_dir), rank
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-adapters-")
        self.root = Path(self._tmp.name)

    def name(self, i: int) -> str:
        return f"bench-r{self.rank}-{i}"

    def path(self, i: int) -> Path:
        p = self.root / self.name(i)
        if not (p / "adapter_model.safetensors").exists():
            common.make_adapter(p, self.dims, rank=self.rank, seed=1000 + i)
        return p

    def cleanup(self) -> None:
        self._tmp.cleanup()


def ensure_adapters(
    url: str, factory: AdapterFactory, n: int, admin_key: str | None, api_key: str | None
) -> tuple[list[str], list[str]]:
    """Upload bench-r<rank>-0..n-1 where missing; returns (all n names, the ones uploaded now)."""
    import httpx

    with httpx.Client() as client:
        r = client.get(f"{url}/v1/models", headers=common.auth(api_key), timeout=30)
        r.raise_for_status()
        have = {m["id"] for m in r.json()["data"]}
        names, uploaded = [factory.name(i) for i in range(n)], []
        t0 = time.perf_counter()
        for i, name in enumerate(names):
            if name not in have:
                common.upload_adapter(client, url, name, factory.path(i), admin_key)
                uploaded.append(name)
        if uploaded:
            print(
                f"uploaded {len(uploaded)} rank-{factory.rank} adapters in "
                f"{time.perf_counter() - t0:.1f} s",
                flush=True,
            )
    return names, uploaded


def delete_adapters(url: str, names: Sequence[str], admin_key: str | None) -> None:
    import httpx

    with httpx.Client() as client:
        for name in names:
            client.delete(f"{url}/v1/adapters/{name}", headers=common.auth(admin_key), timeout=60)


def server_metrics(url: str) -> dict[str, float]:
    """hotlora's counters worth keeping with a result (empty for the baseline, which has none)."""
    import httpx

    try:
        r = httpx.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    if r.status_code != 200 or "hotlora_" not in r.text:
        return {}
    m = common.parse_metrics(r.text)
    keys = (
        "hotlora_adapter_loads_total",
        "hotlora_adapter_evictions_total",
        "hotlora_adapter_merges_total",
        "hotlora_generation_tokens_total",
    )
    out = {k: common.metric(m, k) for k in keys}
    out.update({k: v for k, v in m.items() if k.startswith("hotlora_adapter_loads_total{")})
    for phase in ("prefill", "decode"):
        for stat in ("sum", "count"):
            key = f'hotlora_batch_size_{stat}{{phase="{phase}"}}'
            out[key] = m.get(key, 0.0)
    return out


def cpu_seconds(pid: int | None) -> float:
    """user + system CPU seconds of a process (None = this one), all threads."""
    import os

    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the run added to every counter, and the mean rows per prefill / decode step."""
    out = {k: v - before.get(k, 0.0) for k, v in after.items()}
    for phase in ("prefill", "decode"):
        n = out.get(f'hotlora_batch_size_count{{phase="{phase}"}}', 0.0)
        if n:
            out[f"mean_{phase}_batch"] = out[f'hotlora_batch_size_sum{{phase="{phase}"}}'] / n
    return out


async def greedy_probe(
    url: str, models: Sequence[str], alphabet: Sequence[int], api_key: str | None
) -> dict[str, str]:
    """Greedy 8-token texts for a fixed prompt per model (compared across servers)."""
    import httpx

    prompt = [alphabet[i % len(alphabet)] for i in range(12)]
    out = {}
    async with httpx.AsyncClient(timeout=60) as client:
        for m in models:
            r = await client.post(
                f"{url}/v1/completions",
                headers=common.auth(api_key),
                json={
                    "model": m,
                    "prompt": prompt,
                    "max_tokens": 8,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            out[m] = (
                r.json()["choices"][0]["text"] if r.status_code == 200 else f"HTTP {r.status_code}"
            )
    return out


# ---------------------------------------------------------------------------- driver


@dataclass
class Run:
    system: str
    n_adapters: int
    summary: dict[str, Any]
    results: list[Result]
    metrics: dict[str, float]


def bench_target(
    url: str,
    args: argparse.Namespace,
    system: str,
    ns: Sequence[int],
    factory: AdapterFactory,
    server_pid: int | None = None,
) -> tuple[list[Run], dict[str, str]]:
    """Every N of `ns` against one server: upload, warm up, run, summarize."""
    import httpx

    with httpx.Client() as client:
        base_id = common.base_model_id(client, url, args.api_key)
    alphabet = prompt_alphabet(args.model_dir)
    runs, uploaded = [], []
    probe: dict[str, str] = {}
    try:
        for n in ns:
            names, new = ensure_adapters(url, factory, n, args.admin_key, args.api_key)
            uploaded += new
            if not probe:
                probe = asyncio.run(greedy_probe(url, [base_id, names[0]], alphabet, args.api_key))
            specs = build_requests(
                n=args.num_requests,
                adapters=names,
                base_id=base_id,
                alpha=args.alpha,
                base_share=args.base_share,
                prompt_len=args.prompt_len,
                output_len=args.output_len,
                rate=args.rate,
                alphabet=alphabet,
                seed=args.seed,
            )
            if args.warmup:
                # One 2-token request to the base and to each warmed adapter: the baseline loads
                # every adapter at upload, hotlora on first use; timing starts warm for both.
                k = n if args.warmup < 0 else min(n, args.warmup)
                prompt = [alphabet[i % len(alphabet)] for i in range(8)]
                warm = [
                    RequestSpec(-1 - i, 0.0, m, prompt, 2)
                    for i, m in enumerate([base_id, *names[:k]])
                ]
                asyncio.run(
                    run_load(
                        url,
                        warm,
                        concurrency=args.concurrency,
                        headers=common.auth(args.api_key),
                        timeout=args.timeout,
                        progress=False,
                    )
                )
            label = f"{system} N={n} "
            before = server_metrics(url)
            cpu0 = cpu_seconds(None), cpu_seconds(server_pid)
            results, _ = asyncio.run(
                run_load(
                    url,
                    specs,
                    concurrency=args.concurrency,
                    temperature=args.temperature,
                    headers=common.auth(args.api_key),
                    timeout=args.timeout,
                    max_duration=args.max_duration,
                    label=label,
                    progress=not args.quiet,
                    stream=not args.no_stream,
                )
            )
            summary = summarize_run(results)
            cpu1 = cpu_seconds(None), cpu_seconds(server_pid)
            # CPU time used during the run: the load generator itself and (launched) the server;
            # on a 2-core machine the client's share is capacity the server did not get.
            summary["client_cpu_s"] = cpu1[0] - cpu0[0]
            if server_pid is not None:
                summary["server_cpu_s"] = cpu1[1] - cpu0[1]
            print_summary(label.strip(), summary)
            delta = metrics_delta(before, server_metrics(url)) if before else {}
            if "mean_decode_batch" in delta:
                print(
                    f"  server: mean decode batch {delta['mean_decode_batch']:.1f} rows, "
                    f"adapter loads {delta.get('hotlora_adapter_loads_total', 0):.0f}, "
                    f"evictions {delta.get('hotlora_adapter_evictions_total', 0):.0f}, "
                    f"merges {delta.get('hotlora_adapter_merges_total', 0):.0f}"
                )
            runs.append(Run(system, n, summary, results, delta))
    finally:
        if uploaded and not args.keep_adapters and args.url:
            delete_adapters(url, uploaded, args.admin_key)
    return runs, probe


def launch_args(args: argparse.Namespace, kind: str) -> list[str]:
    if kind != "hotlora":
        return []
    return [
        "--max-adapters",
        str(args.max_adapters),
        "--max-running",
        str(args.max_running),
        "--max-rank",
        str(args.rank),
    ]


def write_outputs(
    args: argparse.Namespace, runs: list[Run], probes: dict[str, dict[str, str]], ns: Sequence[int]
) -> dict[str, Any]:
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    systems = list(dict.fromkeys(r.system for r in runs))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    doc: dict[str, Any] = {
        "config": config,
        "machine": common.machine_info(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": [
            {
                "system": r.system,
                "n_adapters": r.n_adapters,
                "summary": r.summary,
                "server_metrics": r.metrics,
                "throughput_series_bin_s": series_bin(r.results),
                "throughput_series": throughput_series(r.results, series_bin(r.results)),
                "requests": [
                    {k: v for k, v in asdict(x).items() if k not in ("itl", "token_times")}
                    for x in r.results
                ],
            }
            for r in runs
        ],
        "greedy_probe": probes,
    }
    if len(systems) == 2:
        doc["ratios"] = ratios(runs, ns)
    json_path = out_dir / f"{args.name}.json"
    json_path.write_text(json.dumps(doc, indent=1, default=float))
    title = (
        f"{args.model_dir.name}, rank {args.rank}, alpha {args.alpha}, "
        f"{'rate ' + str(args.rate) + ' req/s' if args.rate else 'closed loop'}, "
        f"concurrency {args.concurrency}, prompt {args.prompt_len}, "
        f"output {args.output_len}, {args.num_requests} requests"
    )
    last_n = ns[-1] if not args.sweep else (32 if 32 in ns else ns[-1])
    plot_runs(
        {
            f"{r.system} N={r.n_adapters}": r.results
            for r in runs
            if r.n_adapters == last_n or not args.sweep
        },
        out_dir / f"{args.name}.png",
        title,
    )
    written = [json_path, out_dir / f"{args.name}.png"]
    if args.sweep:
        pts = {s: [(r.n_adapters, r.summary) for r in runs if r.system == s] for s in systems}
        plot_sweep(pts, out_dir / f"{args.name}_sweep.png", title)
        written.append(out_dir / f"{args.name}_sweep.png")
    print("\nwrote " + ", ".join(str(p) for p in written))
    return doc


def ratios(runs: list[Run], ns: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for n in ns:
        by = {r.system: r.summary for r in runs if r.n_adapters == n}
        h, b = by.get("hotlora"), by.get("baseline")
        if h is None or b is None:
            continue
        out.append(
            {
                "n_adapters": n,
                "output_throughput_x": h["output_throughput"] / b["output_throughput"],
                "request_throughput_x": h["request_throughput"] / b["request_throughput"],
                "ttft_p50_x": b["ttft_ms"]["p50"] / h["ttft_ms"]["p50"],
                "ttft_p99_x": b["ttft_ms"]["p99"] / h["ttft_ms"]["p99"],
                "tpot_mean_x": b["tpot_ms"]["mean"] / h["tpot_ms"]["mean"],
                "e2e_p99_x": b["e2e_ms"]["p99"] / h["e2e_ms"]["p99"],
            }
        )
    return out


def print_tables(runs: list[Run], ns: Sequence[int]) -> None:
    print("\n" + TABLE_HEAD)
    for r in runs:
        print(format_row(f"{r.system} N={r.n_adapters}", r.summary))
    rs = ratios(runs, ns)
    if rs:
        print(
            "\nhotlora vs baseline (>1 = hotlora better: throughput hotlora/baseline, "
            "latency baseline/hotlora)\n"
        )
        print("| N | output tok/s | req/s | TTFT p50 | TTFT p99 | TPOT mean | E2E p99 |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for x in rs:
            print(
                f"| {x['n_adapters']} | {x['output_throughput_x']:.2f}x | "
                f"{x['request_throughput_x']:.2f}x | {x['ttft_p50_x']:.2f}x | "
                f"{x['ttft_p99_x']:.2f}x | {x['tpot_mean_x']:.2f}x | {x['e2e_p99_x']:.2f}x |"
            )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    tgt = ap.add_argument_group("target (exactly one)")
    tgt.add_argument("--url", help="a running server, http://127.0.0.1:PORT")
    tgt.add_argument("--launch", choices=["hotlora", "baseline"], help="start this server")
    tgt.add_argument("--compare", action="store_true", help="launch both, same load, ratios")
    ap.add_argument(
        "--model-dir",
        type=Path,
        default=common.DEMO_MODEL,
        help="base model dir (adapter shapes; served model with --launch/--compare)",
    )
    ap.add_argument(
        "--random-base",
        choices=sorted(common.RANDOM_BASES),
        help="serve a random-weight GPT-2 of this shape (built in a temp dir) instead",
    )
    ap.add_argument("--num-adapters", "-N", type=int, default=32)
    ap.add_argument("--sweep", action="store_true", help="run every N of --sweep-n")
    ap.add_argument("--sweep-n", default="1,8,32,128", help="comma-separated N for --sweep")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="popularity power law: 1 = uniform, smaller = more skewed",
    )
    ap.add_argument("--base-share", type=float, default=0.0, help="share of requests to the base")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument(
        "--rate",
        type=float,
        default=None,
        help="Poisson arrivals, req/s (inf = all at once); unset = closed loop",
    )
    ap.add_argument("--concurrency", type=int, default=32, help="max requests in flight")
    ap.add_argument("--prompt-len", type=common.parse_range, default=(8, 48), help="LO:HI tokens")
    ap.add_argument("--output-len", type=common.parse_range, default=(16, 64), help="LO:HI tokens")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument(
        "--no-stream",
        action="store_true",
        help="non-streamed requests (throughput and E2E only; no TTFT/TPOT/ITL)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--warmup",
        type=int,
        default=-1,
        help="adapters to touch (one 2-token request each, plus the base) before timing; "
        "-1 = all N, 0 = no warm-up",
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    ap.add_argument("--max-duration", type=float, default=900.0, help="per run, seconds")
    ap.add_argument("--max-adapters", type=int, default=32, help="launched hotlora's slots")
    ap.add_argument("--max-running", type=int, default=32, help="launched hotlora's batch rows")
    ap.add_argument("--api-key", help="bearer key for completions (a --url server)")
    ap.add_argument("--admin-key", help="bearer key for adapter uploads (a --url server)")
    ap.add_argument(
        "--keep-adapters", action="store_true", help="leave uploaded adapters on a --url server"
    )
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--name", help="output file stem (default from the mode)")
    ap.add_argument("--quiet", action="store_true", help="no per-second progress lines")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if sum([args.url is not None, args.launch is not None, args.compare]) != 1:
        ap.error("give exactly one of --url, --launch, --compare")
    if args.url:
        args.url = common.check_loopback(args.url)
    ns = [int(x) for x in args.sweep_n.split(",")] if args.sweep else [args.num_adapters]
    base_tmp = None
    if args.random_base:
        if args.url:
            ap.error("--random-base needs --launch or --compare (it builds the served model)")
        base_tmp = tempfile.TemporaryDirectory(prefix="bench-base-")
        t_build = time.perf_counter()
        args.model_dir = common.make_random_base(
            Path(base_tmp.name) / args.random_base, args.random_base
        )
        print(f"built a random {args.random_base} base in {time.perf_counter() - t_build:.0f} s")
    try:
        return _run(ap, args, ns)
    finally:
        if base_tmp is not None:
            base_tmp.cleanup()


def _run(ap: argparse.ArgumentParser, args: argparse.Namespace, ns: list[int]) -> int:
    dims = common.base_dims(args.model_dir)
    if args.prompt_len[1] + args.output_len[1] > dims.n_positions:
        ap.error(
            f"--prompt-len + --output-len maximum exceeds the model's context {dims.n_positions}"
        )
    if args.rate is not None and args.rate <= 0:
        ap.error("--rate must be positive")
    mode = "compare" if args.compare else (args.launch or "url")
    args.name = args.name or f"serving_{mode}{'_sweep' if args.sweep else ''}"
    print(
        f"bench_serving: {mode}, N {ns}, {args.num_requests} requests, rank {args.rank}, "
        f"alpha {args.alpha}, rate {args.rate or 'closed loop'}, concurrency "
        f"{args.concurrency}, machine {common.machine_info()}",
        flush=True,
    )

    factory = AdapterFactory(args.model_dir, args.rank)
    runs: list[Run] = []
    probes: dict[str, dict[str, str]] = {}
    t0 = time.perf_counter()
    try:
        if args.url:
            r, probes["url"] = bench_target(args.url, args, "server", ns, factory)
            runs += r
        else:
            systems = ["hotlora", "baseline"] if args.compare else [args.launch]
            for kind in systems:
                with common.ServerProcess(
                    kind, args.model_dir, extra_args=launch_args(args, kind)
                ) as srv:
                    print(f"started {kind} (pid {srv.pid}) at {srv.url}", flush=True)
                    r, probes[kind] = bench_target(srv.url, args, kind, ns, factory, srv.pid)
                    runs += r
    finally:
        factory.cleanup()
    print_tables(runs, ns)
    if len(probes) == 2:
        same = probes["hotlora"] == probes["baseline"]
        print(f"\ngreedy probe (base + first adapter, 8 tokens) identical on both servers: {same}")
        if not same:
            print(f"  {probes}")
    write_outputs(args, runs, probes, ns)
    print(f"bench_serving: done in {time.perf_counter() - t0:.0f} s")
    return 1 if any(r.summary["errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
