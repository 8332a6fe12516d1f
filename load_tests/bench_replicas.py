"""1 vs N engine replicas on Ray Serve: the serving benchmark through the ingress.

    python load_tests/bench_replicas.py                       # 1 and 2 replicas, N = 32
    python load_tests/bench_replicas.py --replicas 1 2 -N 32 --alpha 0.5 --num-requests 256

For each replica count: `hotlora serve --replicas R` (a local Ray cluster, one CPU per replica,
a fresh adapter store) and `load_tests/bench_serving.py --url` against it: N random rank-16
adapters uploaded through the ingress, power-law popularity, streamed requests. Prints request
and token throughput, p99 TTFT, how the requests spread over the replicas
(`X-Hotlora-Replica` is not visible to bench_serving, so this comes from each replica's
`hotlora_requests_total`), and each replica's adapter loads from disk
(`hotlora_adapter_loads_total{tier="disk"}` in the ingress' per-replica /metrics): with
affinity the total stays near N, not N x replicas.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

import bench_serving
from common import DEMO_MODEL, ServerProcess, machine_info


def per_replica(url: str) -> dict[str, dict[str, float]]:
    """Each replica's disk loads and finished requests, from the ingress' merged /metrics."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"disk_loads": 0.0, "requests": 0.0})
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            replica = s.labels.get("replica")
            if replica is None or not s.name.endswith("_total"):
                continue
            if fam.name == "hotlora_adapter_loads" and s.labels.get("tier") == "disk":
                out[replica]["disk_loads"] += s.value
            elif fam.name == "hotlora_requests" and s.labels.get("outcome") in ("stop", "length"):
                out[replica]["requests"] += s.value
    return dict(out)


def run(replicas: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    env = {"HOTLORA_MAX_ADAPTERS": str(args.max_adapters), "HOTLORA_ACCESS_LOG": "false",
           "HOTLORA_SEED_DEMO_ADAPTERS": "false"}  # fmt: skip
    with ServerProcess(
        "hotlora", DEMO_MODEL, extra_args=["--replicas", str(replicas)], env=env,
        store=tmp / f"store-{replicas}", startup_timeout=300,
    ) as srv:  # fmt: skip
        before = per_replica(srv.url)
        name = f"replicas-{replicas}"
        bench_serving.main([
            "--url", srv.url, "-N", str(args.num_adapters), "--alpha", str(args.alpha),
            "--num-requests", str(args.num_requests), "--concurrency", str(args.concurrency),
            "--prompt-len", "8:32", "--output-len", "16:48", "--out-dir", str(tmp),
            "--name", name, "--quiet",
        ])  # fmt: skip
        after = per_replica(srv.url)
    doc = json.loads((tmp / f"{name}.json").read_text())
    summary = doc["runs"][0]["summary"]
    spread = {
        r: {k: after[r][k] - before.get(r, {}).get(k, 0.0) for k in after[r]} for r in after
    }
    return {"replicas": replicas, "summary": summary, "per_replica": spread}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--num-adapters", "-N", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=0.5, help="power law (1 = uniform)")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-adapters", type=int, default=16, help="device slots per replica")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    print(json.dumps(machine_info()))
    with tempfile.TemporaryDirectory(prefix="hotlora-replicas-") as d:
        rows = [run(r, args, Path(d)) for r in args.replicas]
    base = rows[0]["summary"]
    print(f"\nN={args.num_adapters} adapters, alpha {args.alpha}, {args.num_requests} requests, "
          f"concurrency {args.concurrency}, {args.max_adapters} slots per replica")
    for row in rows:
        s = row["summary"]
        loads = {r[:8]: int(v["disk_loads"]) for r, v in row["per_replica"].items()}
        reqs = {r[:8]: int(v["requests"]) for r, v in row["per_replica"].items()}
        print(f"{row['replicas']} replica(s): {s['request_throughput']:.2f} req/s "
              f"(x{s['request_throughput'] / base['request_throughput']:.2f}), "
              f"{s['output_throughput']:.0f} tok/s, p99 TTFT {s['ttft_ms']['p99']:.0f} ms, "
              f"errors {s['errors']}; requests per replica {reqs}; disk loads per replica "
              f"{loads} (total {sum(loads.values())})")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
