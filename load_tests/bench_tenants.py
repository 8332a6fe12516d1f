"""Tenant fairness: does one tenant flooding the server push another tenant's TTFT up?

Three runs against a fresh `hotlora serve` each, the same seeded workload:
  alone  the victim tenant alone, Poisson arrivals at --rate req/s;
  fair   the victim plus a flooding tenant at --flood-ratio x its rate (tenants file: fair
         admission, at most half of the queue per tenant);
  fifo   the same two streams of requests without a tenants file (one FIFO queue), to show
         what fair admission changes.
It prints the victim's TTFT (p50 / p99) and errors per run, and the ratios fair/alone and
fifo/alone (the target: fair/alone p99 <= 2).

    python load_tests/bench_tenants.py                  # 30 s per run
    python load_tests/bench_tenants.py --smoke          # a few seconds per run (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from hotlora.adapters.demo_tasks import DEMO_MODEL
from hotlora.server.tenants import key_digest

from bench_serving import RequestSpec, Result, send
from common import ServerProcess, machine_info, percentile

KEYS = {"victim": "sk-bench-victim", "flood": "sk-bench-flood"}


def arrivals(rng: random.Random, rate: float, duration: float) -> list[float]:
    out, t = [], rng.expovariate(rate)
    while t < duration:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def workload(args: argparse.Namespace, flood: bool) -> list[tuple[str, RequestSpec]]:
    """(tenant, request) by arrival; the victim's requests are the same in every run."""
    rng = random.Random(args.seed)
    prompt = [rng.randrange(32, 120) for _ in range(args.prompt_len)]
    out = []
    tenants = [("victim", args.rate)] + ([("flood", args.rate * args.flood_ratio)] if flood else [])
    for tenant, rate in tenants:
        for t in arrivals(random.Random(f"{args.seed}-{tenant}"), rate, args.duration):
            out.append((tenant, RequestSpec(len(out), t, "", prompt, args.output_len)))
    return sorted(out, key=lambda x: x[1].arrival)


async def run(url: str, model: str, load: list[tuple[str, RequestSpec]]) -> dict[str, list[Result]]:
    results: dict[str, list[Result]] = {"victim": [], "flood": []}
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(tenant: str, spec: RequestSpec) -> None:
            await asyncio.sleep(max(0.0, spec.arrival - (time.perf_counter() - t0)))
            spec = dataclasses.replace(spec, model=model)
            headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
            # The flood is not streamed: on a 2-core machine its client's per-token work would
            # compete with the server for the CPU (only the victim's TTFT is measured).
            results[tenant].append(
                await send(client, url, spec, t0, temperature=0.0, headers=headers,
                           stream=tenant == "victim")
            )

        await asyncio.gather(*(one(t, s) for t, s in load))
    return results


def tenants_file(path: Path) -> Path:
    doc = {"tenants": [{"name": f"bench-{n}", "keys_sha256": [key_digest(k)]}
                       for n, k in KEYS.items()]}
    path.write_text(json.dumps(doc))
    return path


def phase(args: argparse.Namespace, name: str, tmp: Path) -> dict[str, Any]:
    flood = name != "alone"
    env = {"HOTLORA_MAX_RUNNING": str(args.max_running), "HOTLORA_MAX_QUEUE": str(args.max_queue)}
    if name == "fifo":
        env["HOTLORA_API_KEYS"] = ",".join(KEYS.values())
    else:
        env["HOTLORA_TENANTS_FILE"] = str(tenants_file(tmp / "tenants.json"))
    with ServerProcess("hotlora", args.model, env=env, store=tmp / f"store-{name}") as srv:
        model = httpx.get(f"{srv.url}/v1/models", headers={
            "Authorization": f"Bearer {KEYS['victim']}"}).json()["data"][0]["id"]
        res = asyncio.run(run(srv.url, model, workload(args, flood)))
    out: dict[str, Any] = {"run": name}
    for tenant, rs in res.items():
        if not rs:
            continue
        ttft = [r.ttft for r in rs if r.ok and r.ttft is not None]
        out[tenant] = {
            "requests": len(rs),
            "errors": sum(not r.ok for r in rs),
            "ttft_p50_ms": 1000 * percentile(ttft, 50) if ttft else None,
            "ttft_p99_ms": 1000 * percentile(ttft, 99) if ttft else None,
            "ttft_ms": sorted(round(1000 * t, 1) for t in ttft),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--rate", type=float, default=2.0, help="the victim's requests/s")
    ap.add_argument("--flood-ratio", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per run")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=100)
    ap.add_argument("--max-running", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few seconds per run (CI)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.duration = 3.0
    print(json.dumps(machine_info()))
    with tempfile.TemporaryDirectory(prefix="hotlora-tenants-") as d:
        runs = {name: phase(args, name, Path(d)) for name in ("alone", "fair", "fifo")}
    print(f"{'run':<6} {'tenant':<7} {'requests':>8} {'errors':>6} {'TTFT p50 ms':>12} "
          f"{'TTFT p99 ms':>12}")
    for name, r in runs.items():
        for tenant in ("victim", "flood"):
            s = r.get(tenant)
            if s:
                p50 = "-" if s["ttft_p50_ms"] is None else f"{s['ttft_p50_ms']:.1f}"
                p99 = "-" if s["ttft_p99_ms"] is None else f"{s['ttft_p99_ms']:.1f}"
                print(f"{name:<6} {tenant:<7} {s['requests']:>8} {s['errors']:>6} {p50:>12} "
                      f"{p99:>12}")
    alone = runs["alone"]["victim"]["ttft_p99_ms"]
    for name in ("fair", "fifo"):
        p99 = runs[name]["victim"]["ttft_p99_ms"]
        ratio = "-" if not alone or p99 is None else f"{p99 / alone:.2f}"
        print(f"victim p99 TTFT {name}/alone: {ratio}")
    if args.out:
        args.out.write_text(json.dumps(runs, indent=2))
    victim_errors = runs["fair"]["victim"]["errors"] + runs["alone"]["victim"]["errors"]
    return 1 if victim_errors else 0


if __name__ == "__main__":
    sys.exit(main())
