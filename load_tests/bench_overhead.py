"""Serving overhead: the same seeded workload through the offline engine and through the server.

For every C (concurrency) and N (adapters) it runs, one after the other on the same machine:
  offline: `Engine` driven through its step API, a closed loop of C rows (a finished request is
           replaced by the next at once), requests drawn exactly as bench_serving draws them;
  served:  `hotlora serve` (a subprocess) and C closed-loop HTTP clients, streamed (SSE) and not.
It prints output tok/s for each and served / offline (medians of --repeat runs). Nothing else
runs in between; on a 2-core machine the load generator's CPU is capacity the server does not
get (printed alongside).

    python load_tests/bench_overhead.py                       # C = 8, 32; N = 1, 32
    python load_tests/bench_overhead.py -C 32 -N 1 --num-requests 400
    python load_tests/bench_overhead.py --smoke               # CI: tiny, checks it runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import bench_serving as bs
import common


@dataclass
class Row:
    concurrency: int
    adapters: int
    stream: bool
    offline_tok_s: float
    served_tok_s: float
    client_cpu_s: float
    server_cpu_s: float  # the API process and the engine process
    errors: int
    offline_decode_batch: float  # mean rows per decode step
    served_decode_batch: float
    offline_prefills: int  # prefill steps
    served_prefills: int

    @property
    def ratio(self) -> float:
        return self.served_tok_s / self.offline_tok_s if self.offline_tok_s else float("nan")


def _specs(args: argparse.Namespace, names: list[str], base_id: str) -> list[bs.RequestSpec]:
    return bs.build_requests(
        n=args.num_requests,
        adapters=names,
        base_id=base_id,
        alpha=1.0,
        base_share=0.0,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        rate=None,
        alphabet=bs.prompt_alphabet(args.model_dir),
        seed=args.seed,
    )


@dataclass
class Offline:
    tok_s: float
    decode_batch: float
    prefills: int


def offline_run(
    args: argparse.Namespace, factory: bs.AdapterFactory, c: int, n: int, slots: int
) -> Offline:
    """A closed loop of c rows through Engine.add_request/step: output tok/s and batch shape."""
    import torch

    from hotlora.server.engine import Engine, EngineConfig, SamplingParams

    engine = Engine.from_pretrained(
        args.model_dir, EngineConfig(max_batch=c, max_adapters=slots, max_rank=args.rank)
    )
    names = [factory.name(i) for i in range(n)]
    for i, name in enumerate(names):
        engine.add_adapter(name, factory.path(i))
    specs = _specs(args, names, "base")
    shape = {"prefills": 0, "decodes": 0, "decode_rows": 0}

    def params(spec: bs.RequestSpec) -> SamplingParams:
        return SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True)

    def run(todo: list[bs.RequestSpec]) -> int:
        queue, live, tokens = list(reversed(todo)), 0, 0
        while queue or live:
            while queue and live < c:
                spec = queue.pop()
                adapter = None if spec.model == "base" else spec.model
                engine.add_request(spec.prompt_ids, adapter, params(spec))
                live += 1
            prefill = engine.num_waiting > 0
            outs = engine.step()
            shape["prefills" if prefill else "decodes"] += 1
            shape["decode_rows"] += 0 if prefill else len(outs)
            for out in outs:
                tokens += len(out.new_token_ids)
                live -= out.finished
        return tokens

    with torch.inference_mode():
        run(specs[: min(len(specs), 2 * c)])  # warm-up: allocator, first-touch of every path
        shape.update(prefills=0, decodes=0, decode_rows=0)
        t0 = time.perf_counter()
        tokens = run(specs)
        wall = time.perf_counter() - t0
    return Offline(
        tokens / wall, shape["decode_rows"] / max(shape["decodes"], 1), shape["prefills"]
    )


def _median(runs: list[Offline]) -> Offline:
    return sorted(runs, key=lambda r: r.tok_s)[len(runs) // 2]


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its children (the server's engine process)."""
    return sum(bs.cpu_seconds(p) for p in common.process_tree(pid))


def served(
    args: argparse.Namespace, factory: bs.AdapterFactory, c: int, n: int, slots: int
) -> list[tuple[bool, float, float, float, int, float, int]]:
    """(stream, tok/s, client CPU s, server CPU s, errors, mean decode batch, prefill steps)
    for streamed and plain clients."""
    import httpx

    extra = ["--max-running", str(c), "--max-adapters", str(slots), "--max-rank", str(args.rank)]
    out = []
    with common.ServerProcess("hotlora", args.model_dir, extra_args=extra) as server:
        names, _ = bs.ensure_adapters(server.url, factory, n, None, None)
        with httpx.Client() as client:
            base_id = common.base_model_id(client, server.url)
        specs = _specs(args, names, base_id)
        warm = [bs.RequestSpec(-1 - i, 0.0, m, specs[0].prompt_ids, 2) for i, m in enumerate(names)]
        asyncio.run(bs.run_load(server.url, warm, concurrency=c, progress=False))
        for stream in [True, False] * args.repeat:
            before = bs.server_metrics(server.url)
            cpu0 = bs.cpu_seconds(None), tree_cpu_seconds(server.pid)
            results, _ = asyncio.run(
                bs.run_load(server.url, specs, concurrency=c, progress=False, stream=stream)
            )
            cpu1 = bs.cpu_seconds(None), tree_cpu_seconds(server.pid)
            delta = bs.metrics_delta(before, bs.server_metrics(server.url))
            summary = bs.summarize_run(results)
            errors = sum(not r.ok for r in results)
            prefills = int(delta.get('hotlora_batch_size_count{phase="prefill"}', 0))
            out.append(
                (
                    stream,
                    summary["output_throughput"],
                    cpu1[0] - cpu0[0],
                    cpu1[1] - cpu0[1],
                    errors,
                    delta.get("mean_decode_batch", float("nan")),
                    prefills,
                )
            )
    return out


def print_table(rows: Sequence[Row]) -> None:
    print(
        f"{'C':>3} {'N':>4} {'stream':>6} {'offline tok/s':>14} {'served tok/s':>13} "
        f"{'served/offline':>15} {'client CPU s':>13} {'server CPU s':>13} {'errors':>6} "
        f"{'decode rows off/srv':>20} {'prefills off/srv':>17}"
    )
    for r in rows:
        print(
            f"{r.concurrency:>3} {r.adapters:>4} {str(r.stream):>6} {r.offline_tok_s:>14.1f} "
            f"{r.served_tok_s:>13.1f} {r.ratio:>15.3f} {r.client_cpu_s:>13.1f} "
            f"{r.server_cpu_s:>13.1f} {r.errors:>6} "
            f"{r.offline_decode_batch:>9.1f}/{r.served_decode_batch:<10.1f} "
            f"{r.offline_prefills:>7}/{r.served_prefills:<9}"
        )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model-dir", type=Path, default=common.DEMO_MODEL)
    ap.add_argument("-C", "--concurrency", default="8,32", help="comma-separated C")
    ap.add_argument("-N", "--num-adapters", default="1,32", help="comma-separated N")
    ap.add_argument("--num-requests", type=int, default=400)
    ap.add_argument("--prompt-len", type=common.parse_range, default=(8, 48))
    ap.add_argument("--output-len", type=common.parse_range, default=(16, 64))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is kept)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--smoke", action="store_true", help="C=4, N=2, 16 short requests")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.concurrency, args.num_adapters, args.num_requests, args.repeat = "4", "2", 16, 1
        args.prompt_len, args.output_len = (4, 8), (4, 8)
    cs = [int(x) for x in args.concurrency.split(",")]
    ns = [int(x) for x in args.num_adapters.split(",")]
    factory = bs.AdapterFactory(args.model_dir, args.rank)
    rows: list[Row] = []
    try:
        for c in cs:
            for n in ns:
                slots = max(16, n)  # the server's default, or every adapter resident
                # repeats, then medians: a shared 2-core machine varies by +-15% run to run
                off = _median([offline_run(args, factory, c, n, slots) for _ in range(args.repeat)])
                runs = served(args, factory, c, n, slots)
                for stream in (True, False):
                    mine = [r for r in runs if r[0] == stream]
                    _, tok_s, ccpu, scpu, err, batch, pre = sorted(mine, key=lambda r: r[1])[
                        len(mine) // 2
                    ]
                    rows.append(
                        Row(
                            c,
                            n,
                            stream,
                            off.tok_s,
                            tok_s,
                            ccpu,
                            scpu,
                            err,
                            off.decode_batch,
                            batch,
                            off.prefills,
                            pre,
                        )
                    )
                    print_table(rows[-1:])
    finally:
        factory.cleanup()
    print(f"\nmachine: {json.dumps(common.machine_info())}")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"ratio": r.ratio} for r in rows], indent=1))
    return 1 if any(r.errors for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
