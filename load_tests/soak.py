"""Soak test: mixed traffic plus adapter churn for a bounded time; exits 1 on any violation.

It starts hotlora on --model-dir (a subprocess on a free 127.0.0.1 port; or targets --url, with
--pid to read its memory), uploads the probe adapters (on the demo model: the four demo adapters
as probe-<task>; else --probes synthetic ones), then for --duration seconds runs at once:

  traffic   --workers clients, back to back: completions and SSE streams (half each), over the
            base, the probe adapters and the churn adapters (churn-0..K-1), greedy or seeded
            sampling, 4-32 new tokens;
  churn     every --churn-interval seconds one admin action on a churn adapter: upload it if
            absent, else replace it (a new version) or delete it;
  probes    every --probe-interval seconds the fixed probe set (base + probe adapters x 3
            prompts, greedy, 16 tokens) again, compared with the outputs recorded at the start;
  memory    the server's VmRSS (/proc/<pid>/status) once a second.

Then it deletes every churn adapter and checks that the server went idle.

It FAILS (exit 1, each reason printed) on:
  - any 5xx, and any response that is not complete: a non-stream body without a finish_reason
    or usage, a stream without a finish_reason chunk and [DONE], an SSE error event, a
    connection error or a timeout (--request-timeout); every sent request must end complete;
  - any 4xx but the one expected 4xx: 404 for a churn adapter that was absent (deleted, or
    not yet uploaded) at some moment while the request was in flight;
  - an admin call that does not succeed (upload != 201, delete != 200);
  - a probe output that differs from its start-of-run value (probe adapters are never touched);
  - RSS at the end of the traffic more than --max-rss-growth (5%) above RSS at the end of the
    warm-up (--warmup seconds; the launched server's CPU adapter cache is capped at
    --cpu-cache-bytes so that it reaches its bound during warm-up);
  - not idle within 10 s after the churn adapters are deleted: hotlora_num_requests_running
    and hotlora_num_requests_waiting must be 0 and hotlora_adapter_slots_used <= the number of
    probe adapters (only probe adapters may stay resident);
  - the server process exiting during the run.

CI runs:  python load_tests/soak.py --duration 120      (about 2 minutes end to end)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common

PROBE_WORDS = ("hotlora", "adapter", "kernel")
IDLE_TIMEOUT = 10.0  # seconds for the server to go idle after the churn adapters are deleted
DEMO_PROBE_WORDS = {"sort": ("4719", "80512", "99120")}


@dataclass
class Soak:
    url: str
    admin_key: str | None
    base_id: str = ""
    probes: list[str] = field(default_factory=list)  # probe adapter names
    churn: list[str] = field(default_factory=list)
    # churn name -> list of (t_start, t_end) intervals during which it was (maybe) absent;
    # t_end is None while it still is.
    absent: dict[str, list[list[float | None]]] = field(default_factory=dict)
    present: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    rss: list[tuple[float, int]] = field(default_factory=list)
    probe_reference: dict[tuple[str, str], str] = field(default_factory=dict)
    probe_prompts: dict[str, list[str]] = field(default_factory=dict)
    stop: bool = False

    def fail(self, why: str) -> None:
        self.counts["failures"] += 1
        if len(self.failures) < 50:
            self.failures.append(why)
        print(f"FAIL: {why}", flush=True)

    def was_absent(self, name: str, t0: float, t1: float) -> bool:
        for start, end in self.absent.get(name, []):
            assert start is not None
            if start <= t1 and (end is None or end >= t0):
                return True
        return False


def _prompt(rng: random.Random) -> str:
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
    return f"in: {word}\nout:"


async def complete(
    soak: Soak,
    client: Any,
    model: str,
    prompt: str,
    max_tokens: int,
    *,
    stream: bool,
    temperature: float = 0.0,
    seed: int | None = None,
    timeout: float = 60.0,
) -> tuple[int | None, str | None, str]:
    """One request; returns (status, text or None when incomplete, why-incomplete)."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
    }
    if not stream:
        r = await client.post(f"{soak.url}/v1/completions", json=body, timeout=timeout)
        if r.status_code != 200:
            return r.status_code, None, r.text[:200]
        data = r.json()
        choice = data["choices"][0]
        if choice.get("finish_reason") not in ("stop", "length") or not data.get("usage"):
            return 200, None, f"incomplete body {json.dumps(data)[:200]}"
        return 200, choice["text"], ""
    body.update(stream=True, stream_options={"include_usage": True})
    text, finish, done, usage = "", None, False, None
    async with client.stream("POST", f"{soak.url}/v1/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            return r.status_code, None, (await r.aread()).decode(errors="replace")[:200]
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            obj = json.loads(line[6:])
            if "error" in obj:
                return 200, None, f"SSE error event: {obj['error']}"
            if obj.get("choices"):
                text += obj["choices"][0]["text"]
                finish = obj["choices"][0].get("finish_reason") or finish
            if obj.get("usage"):
                usage = obj["usage"]
    if not done or finish not in ("stop", "length") or usage is None:
        return 200, None, f"incomplete stream (done={done}, finish={finish}, usage={usage})"
    return 200, text, ""


async def traffic_worker(
    soak: Soak, client: Any, wid: int, args: argparse.Namespace, deadline: float
) -> None:
    rng = random.Random(1000 + wid)
    models = [soak.base_id, *soak.probes]
    while not soak.stop and time.monotonic() < deadline:
        if soak.counts["requests"] >= args.max_requests:
            return
        soak.counts["requests"] += 1
        model = rng.choice(soak.churn) if rng.random() < 0.5 else rng.choice(models)
        stream = rng.random() < 0.5
        greedy = rng.random() < 0.5
        t0 = time.monotonic()
        try:
            status, text, why = await complete(
                soak,
                client,
                model,
                _prompt(rng),
                rng.randint(4, 32),
                stream=stream,
                temperature=0.0 if greedy else 0.8,
                seed=None if greedy else rng.randint(0, 9999),
                timeout=args.request_timeout,
            )
        except Exception as e:
            soak.fail(f"request to {model} (stream={stream}) lost: {type(e).__name__}: {e}")
            continue
        t1 = time.monotonic()
        kind = "stream" if stream else "completion"
        if status == 200 and text is not None:
            soak.counts[f"ok_{kind}"] += 1
        elif status == 200:
            soak.fail(f"{kind} on {model} incomplete: {why}")
        elif status == 404 and model in soak.churn and soak.was_absent(model, t0, t1):
            soak.counts["expected_404"] += 1
        elif status is not None and status >= 500:
            soak.fail(f"{kind} on {model}: HTTP {status}: {why}")
        else:
            soak.fail(f"{kind} on {model}: unexpected HTTP {status}: {why}")


async def churn_worker(
    soak: Soak, client: Any, variants: Sequence[Path], args: argparse.Namespace, deadline: float
) -> None:
    rng = random.Random(7)
    headers = common.auth(soak.admin_key)
    while not soak.stop and time.monotonic() < deadline:
        await asyncio.sleep(args.churn_interval)
        name = rng.choice(soak.churn)
        if name in soak.present and rng.random() < 0.5:
            # Delete: absent from the moment the call starts (the store may drop it any time).
            soak.absent.setdefault(name, []).append([time.monotonic(), None])
            soak.present.discard(name)
            r = await client.delete(f"{soak.url}/v1/adapters/{name}", headers=headers, timeout=60)
            soak.counts["deletes"] += 1
            if r.status_code != 200:
                soak.fail(f"DELETE {name}: HTTP {r.status_code}: {r.text[:200]}")
        else:
            replace = name in soak.present
            path = rng.choice(variants)
            r = await client.post(
                f"{soak.url}/v1/adapters",
                data={"name": name},
                files=common.adapter_files(path),
                headers=headers,
                timeout=60,
            )
            soak.counts["replaces" if replace else "uploads"] += 1
            if r.status_code != 201:
                soak.fail(f"upload {name}: HTTP {r.status_code}: {r.text[:200]}")
                continue
            for interval in soak.absent.get(name, []):
                if interval[1] is None:
                    interval[1] = time.monotonic()
            soak.present.add(name)


async def run_probes(soak: Soak, client: Any, record: bool) -> None:
    """The fixed probe set; records it, or compares with the record."""
    jobs = []
    for model, prompts in soak.probe_prompts.items():
        for p in prompts:
            jobs.append((model, p))

    async def one(model: str, prompt: str) -> None:
        # Streamed on odd checks, non-streamed on even ones: both must give the same text.
        stream = not record and soak.counts["probe_checks"] % 2 == 1
        status, text, why = await complete(soak, client, model, prompt, 16, stream=stream)
        if status != 200 or text is None:
            soak.fail(f"probe {model} {prompt!r}: HTTP {status} {why}")
            return
        if record:
            soak.probe_reference[(model, prompt)] = text
        elif soak.probe_reference[(model, prompt)] != text:
            soak.fail(
                f"probe {model} {prompt!r} changed: {soak.probe_reference[(model, prompt)]!r}"
                f" -> {text!r} (stream={stream})"
            )

    await asyncio.gather(*(one(m, p) for m, p in jobs))
    if not record:
        soak.counts["probe_checks"] += 1


async def probe_worker(soak: Soak, client: Any, args: argparse.Namespace, deadline: float) -> None:
    while not soak.stop and time.monotonic() < deadline:
        await asyncio.sleep(args.probe_interval)
        await run_probes(soak, client, record=False)


async def rss_worker(soak: Soak, pid: int | None, t_start: float) -> None:
    if pid is None:
        return
    while not soak.stop:
        try:
            soak.rss.append((time.monotonic() - t_start, common.rss_bytes(pid)))
        except (OSError, RuntimeError):
            soak.fail(f"server process {pid} is gone")
            return
        await asyncio.sleep(1.0)


async def progress_worker(soak: Soak, t_start: float, duration: float) -> None:
    while not soak.stop:
        await asyncio.sleep(10.0)
        c = soak.counts
        rss = f"{soak.rss[-1][1] / 2**20:.0f} MiB" if soak.rss else "-"
        print(
            f"[{time.monotonic() - t_start:5.0f}/{duration:.0f}s] requests {c['requests']} "
            f"(ok {c['ok_completion']} + {c['ok_stream']} streams, 404 {c['expected_404']}) "
            f"uploads {c['uploads']} replaces {c['replaces']} deletes {c['deletes']} "
            f"probe checks {c['probe_checks']} rss {rss} failures {c['failures']}",
            flush=True,
        )


async def wait_idle(soak: Soak, client: Any, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = common.parse_metrics((await client.get(f"{soak.url}/metrics", timeout=30)).text)
        state = {
            k: common.metric(m, k)
            for k in (
                "hotlora_num_requests_running",
                "hotlora_num_requests_waiting",
                "hotlora_adapter_slots_used",
            )
        }
        idle = (
            state["hotlora_num_requests_running"] == 0
            and state["hotlora_num_requests_waiting"] == 0
            and state["hotlora_adapter_slots_used"] <= len(soak.probes)
        )
        if idle or time.monotonic() > deadline:
            if not idle:
                soak.fail(
                    f"server not idle {timeout:.0f} s after the churn adapters were "
                    f"deleted: {state} (probe adapters: {len(soak.probes)})"
                )
            return state
        await asyncio.sleep(0.5)


async def soak_main(
    soak: Soak,
    args: argparse.Namespace,
    pid: int | None,
    probe_dirs: dict[str, Path],
    variants: list[Path],
) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=args.workers + 16)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        r = await client.get(f"{soak.url}/v1/models")
        r.raise_for_status()
        soak.base_id = r.json()["data"][0]["id"]
        headers = common.auth(soak.admin_key)
        for name, path in probe_dirs.items():
            r = await client.post(
                f"{soak.url}/v1/adapters",
                data={"name": name},
                files=common.adapter_files(path),
                headers=headers,
            )
            if r.status_code != 201:
                raise SystemExit(f"soak: could not upload probe {name}: {r.status_code} {r.text}")
        soak.probes = list(probe_dirs)
        soak.churn = [f"churn-{i}" for i in range(args.churn_adapters)]
        for name in soak.churn:
            soak.absent[name] = [[0.0, None]]  # absent until first uploaded
        soak.probe_prompts = {soak.base_id: [f"in: {w}\nout:" for w in PROBE_WORDS]}
        for name in soak.probes:
            task = name.removeprefix("probe-")
            words = DEMO_PROBE_WORDS.get(task, PROBE_WORDS)
            soak.probe_prompts[name] = [f"in: {w}\nout:" for w in words]
        await run_probes(soak, client, record=True)
        print(
            f"soak: {len(soak.probe_reference)} probe outputs recorded, e.g. "
            f"{next(iter(soak.probe_reference.items()))}",
            flush=True,
        )

        t_start = time.monotonic()
        deadline = t_start + args.duration
        workers = [
            asyncio.create_task(traffic_worker(soak, client, i, args, deadline))
            for i in range(args.workers)
        ]
        workers.append(asyncio.create_task(churn_worker(soak, client, variants, args, deadline)))
        workers.append(asyncio.create_task(probe_worker(soak, client, args, deadline)))
        side = [
            asyncio.create_task(rss_worker(soak, pid, t_start)),
            asyncio.create_task(progress_worker(soak, t_start, args.duration)),
        ]
        await asyncio.gather(*workers)
        traffic_s = time.monotonic() - t_start
        soak.stop = True
        for t in side:
            t.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        end_rss = common.rss_bytes(pid) if pid is not None else None

        # Final probe check, then delete every churn adapter and wait for the server to idle.
        await run_probes(soak, client, record=False)
        for name in soak.churn:
            r = await client.delete(f"{soak.url}/v1/adapters/{name}", headers=headers)
            if r.status_code not in (200, 404) or (r.status_code == 404) == (name in soak.present):
                soak.fail(
                    f"final DELETE {name}: HTTP {r.status_code} (present={name in soak.present})"
                )
        idle = await wait_idle(soak, client, IDLE_TIMEOUT)
        for name in soak.probes:  # leave a --url server as we found it
            await client.delete(f"{soak.url}/v1/adapters/{name}", headers=headers)
    return {"traffic_s": traffic_s, "end_rss": end_rss, "idle": idle}


def check_memory(soak: Soak, args: argparse.Namespace, end_rss: int | None) -> dict[str, Any]:
    if not soak.rss or end_rss is None:
        print("soak: no server pid, so no memory check (give --pid with --url)")
        return {}
    warm = [b for t, b in soak.rss if t <= args.warmup]
    if not warm:
        soak.fail(f"no RSS sample within the {args.warmup} s warm-up")
        return {}
    warm_rss, peak = warm[-1], max(b for _, b in soak.rss)
    growth = end_rss / warm_rss - 1
    out = {
        "warm_rss_mib": warm_rss / 2**20,
        "end_rss_mib": end_rss / 2**20,
        "peak_rss_mib": peak / 2**20,
        "growth": growth,
    }
    if growth > args.max_rss_growth:
        soak.fail(
            f"RSS grew {growth:.1%} after warm-up ({warm_rss / 2**20:.0f} -> "
            f"{end_rss / 2**20:.0f} MiB), limit {args.max_rss_growth:.0%}"
        )
    return out


def tracebacks(log: str) -> list[str]:
    """Each traceback in a log, with the line that announced it and the exception line."""
    lines, out, i = log.splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("Traceback"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j].strip()):
                j += 1
            out.append("\n".join(lines[max(0, i - 1) : j + 1]))
            i = j
        i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    ap.add_argument("--url", help="target a running hotlora (http://127.0.0.1:PORT)")
    ap.add_argument("--pid", type=int, help="the --url server's pid, for the memory check")
    ap.add_argument("--admin-key", help="bearer key for adapter changes (a --url server)")
    ap.add_argument("--model-dir", type=Path, default=common.DEMO_MODEL)
    ap.add_argument("--workers", type=int, default=6, help="concurrent traffic clients")
    ap.add_argument("--max-requests", type=int, default=20000, help="traffic request cap")
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--churn-adapters", type=int, default=4)
    ap.add_argument("--churn-interval", type=float, default=0.5, help="seconds per admin action")
    ap.add_argument("--probe-interval", type=float, default=10.0)
    ap.add_argument("--probes", type=int, default=4, help="synthetic probes (non-demo models)")
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds before the RSS baseline")
    ap.add_argument("--max-rss-growth", type=float, default=0.05)
    ap.add_argument(
        "--max-adapters",
        type=int,
        default=8,
        help="launched server's device slots (fewer than adapters: evictions)",
    )
    ap.add_argument(
        "--cpu-cache-bytes",
        type=int,
        default=8 << 20,
        help="launched server's CPU adapter cache (HOTLORA_CPU_CACHE_BYTES)",
    )
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--server-log", type=Path, help="keep the launched server's log here")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.warmup >= args.duration:
        ap.error("--warmup must be shorter than --duration")
    t0 = time.perf_counter()
    dims = common.base_dims(args.model_dir)
    tmp = tempfile.TemporaryDirectory(prefix="soak-")
    root = Path(tmp.name)
    demo = args.model_dir.resolve() == common.DEMO_MODEL.resolve()
    if demo:
        demo_adapters = common.DEMO_MODEL.parent / "adapters"
        probe_dirs = {
            f"probe-{t}": demo_adapters / t
            for t in ("reverse", "upper", "sort", "pirate", "upper-deu")
        }
    else:
        probe_dirs = {
            f"probe-{i}": common.make_adapter(root / f"probe-{i}", dims, rank=8, seed=100 + i)
            for i in range(args.probes)
        }
    variants = [
        common.make_adapter(root / f"variant-{i}", dims, rank=r, seed=200 + i)
        for i, r in enumerate((4, 8, 16, 8))
    ]

    server = None
    if args.url:
        url, pid = common.check_loopback(args.url), args.pid
    else:
        server = common.ServerProcess(
            "hotlora",
            args.model_dir,
            extra_args=["--max-adapters", str(args.max_adapters)],
            env={
                "HOTLORA_CPU_CACHE_BYTES": str(args.cpu_cache_bytes),
                "HOTLORA_SEED_DEMO_ADAPTERS": "false",
                "HOTLORA_LOG_LEVEL": "warning",  # no access log: warnings and errors only
            },
        ).start()
        url, pid = server.url, server.pid
        print(f"soak: started hotlora (pid {pid}) at {url}", flush=True)
    soak = Soak(url, args.admin_key)
    result: dict[str, Any] = {}
    try:
        result = asyncio.run(soak_main(soak, args, pid, probe_dirs, variants))
        mem = check_memory(soak, args, result["end_rss"])
        result["memory"] = mem
        if server is not None and server.proc is not None and server.proc.poll() is not None:
            soak.fail(f"the server exited with {server.proc.returncode}")
    finally:
        if server is not None:
            code = server.stop()
            log = server.log_path.read_text(errors="replace")
            if args.server_log:
                args.server_log.write_text(log)
            blocks = tracebacks(log)
            result["server_exit"], result["server_log_tracebacks"] = code, len(blocks)
            for i, block in enumerate(blocks[:3]):
                print(f"soak: server traceback {i + 1} of {len(blocks)}:\n{block}")
            server.cleanup()
        tmp.cleanup()

    c = soak.counts
    print("\n=== soak summary ===")
    print(
        f"traffic {result.get('traffic_s', 0):.0f} s: {c['requests']} requests, "
        f"{c['ok_completion']} completions + {c['ok_stream']} streams complete, "
        f"{c['expected_404']} expected 404s (churn adapter absent)"
    )
    print(
        f"churn: {c['uploads']} uploads, {c['replaces']} replaces, {c['deletes']} deletes; "
        f"probe checks: {c['probe_checks']} x {len(soak.probe_reference)} outputs"
    )
    mem = result.get("memory") or {}
    if mem:
        print(
            f"server RSS: {mem['warm_rss_mib']:.0f} MiB after {args.warmup:.0f} s warm-up, "
            f"{mem['end_rss_mib']:.0f} MiB at the end ({mem['growth']:+.1%}), "
            f"peak {mem['peak_rss_mib']:.0f} MiB"
        )
    print(f"after deleting the churn adapters: {result.get('idle')}")
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"counts": dict(c), "failures": soak.failures, **result}, indent=1, default=str
            )
        )
    if soak.failures or c["failures"]:
        print(f"\nSOAK FAILED: {c['failures']} failures; first ones:")
        for f in soak.failures[:20]:
            print(f"  - {f}")
        return 1
    print("SOAK PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
