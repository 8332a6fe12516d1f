"""1 vs N engine replicas on Ray Serve (server/ray_app.py), the demo model, through the ingress.

    python load_tests/bench_replicas.py --replicas 1 2 --requests 64 --concurrency 16

For each replica count: a local Ray cluster (--num-cpus), the demo adapters uploaded by the
store seeding, `--requests` greedy completions over the demo adapters (round robin) with
`--concurrency` in flight; prints requests/s, generated tokens/s and p50/p99 latency, and how
the requests spread over the replicas (X-Hotlora-Replica). (Hot-swap propagation per replica is
measured by tests/ray/test_ray_serve.py, which prints it with -s.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

NAMES = ["pirate", "reverse", "upper", "upper-deu"]


def _run(replicas: int, args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from adapters.demo_tasks import DEMO_MODEL, prompt_for
    from server.config import Settings
    from server.ray_app import REPLICA_HEADER, application
    from tests.server.support import free_port

    root = Path(tempfile.mkdtemp(prefix="hotlora-bench-"))
    settings = Settings(
        model=DEMO_MODEL, adapter_store=root / "store", replicas=replicas,
        replica_num_cpus=args.num_cpus / replicas, engine_process=False,
        engine_threads=max(1, args.num_cpus // replicas), access_log=False,
    )  # fmt: skip
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(settings), name="hotlora", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/completions"

        def one(i: int) -> tuple[float, int, str]:
            body = {"model": NAMES[i % len(NAMES)], "prompt": prompt_for("adapters"),
                    "max_tokens": 24, "temperature": 0}  # fmt: skip
            t = time.perf_counter()
            r = httpx.post(url, json=body, timeout=120)
            r.raise_for_status()
            tokens = r.json()["usage"]["completion_tokens"]
            return time.perf_counter() - t, tokens, r.headers[REPLICA_HEADER]

        for i in range(len(NAMES)):  # warm-up: each adapter placed and resident
            one(i)
            time.sleep(0.5)
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - start
        lat = sorted(r[0] for r in results)
        out = {
            "replicas": replicas,
            "requests_per_s": round(args.requests / wall, 2),
            "tokens_per_s": round(sum(r[1] for r in results) / wall, 1),
            "p50_s": round(statistics.median(lat), 3),
            "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
            "per_replica": dict(Counter(r[2] for r in results)),
        }
        print(json.dumps(out))
        return out
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()
    rows = [_run(n, args) for n in args.replicas]
    base = rows[0]["tokens_per_s"]
    for row in rows:
        print(f"{row['replicas']} replicas: {row['requests_per_s']} req/s, "
              f"{row['tokens_per_s']} tok/s (x{row['tokens_per_s'] / base:.2f}), "
              f"p50 {row['p50_s']} s, p99 {row['p99_s']} s, {row['per_replica']}")  # fmt: skip


if __name__ == "__main__":
    main()
