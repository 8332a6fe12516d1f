"""GPU micro-benchmark of the SGMV kernels, for a task lent a CUDA card (gpu_check.sh runs it).

Triton sgmv_shrink / sgmv_expand (kernels/triton_lora.py) vs the torch path on the same device
(kernels.lora's per-slot matmuls, forced through _torch_apply) and a naive gathered bmm,
GPT-2-small target shapes, S=64 resident slots, rank 16. Reports us per call, achieved GB/s
over the bytes the op must move at least (x, the used A/B slices, y read+write, the fp32 rank
buffer), and that as a share of the card's memory bandwidth: the spec value when the card is
known, and a measured device copy. Every result is checked against kernels.lora_reference first.
The offline engine on the GPU is bench_offline.py --device cuda --dtype float16.

    python load_tests/bench_gpu_kernels.py [--json out.json]
    python load_tests/bench_gpu_kernels.py --dry-run    # imports and arguments only (any CPU)
    python load_tests/bench_gpu_kernels.py --smoke --device cpu   # tiny shapes, the Triton
        interpreter on CPU (TRITON_INTERPRET=1): checks the code path, the timings mean nothing
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common

# Spec DRAM bandwidth (GB/s) by a substring of torch.cuda.get_device_name().
SPEC_GBPS = {
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 80GB HBM3": 3350,
    "H100 NVL": 3900,
    "H100 PCIe": 2000,
    "H100": 3350,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "L40S": 864,
    "L40": 864,
    "L4": 300,
    "A10G": 600,
    "A10": 600,
    "T4": 320,
    "V100": 900,
    "RTX 4090": 1008,
}

SHAPES = [
    ("c_attn", 768, 2304),
    ("attn.c_proj", 768, 768),
    ("mlp.c_fc", 768, 3072),
    ("mlp.c_proj", 3072, 768),
]
SMOKE_SHAPES = [("small", 64, 96)]
# (label, tokens T, distinct slots G)
SCENARIOS = [
    ("decode T=32, 1 slot", 32, 1),
    ("decode T=32, 32 slots", 32, 32),
    ("decode T=256, 64 slots", 256, 64),
    ("prefill T=2048, 4 slots", 2048, 4),
]
SMOKE_SCENARIOS = [("T=8, 4 slots", 8, 4)]
S, R = 64, 16


def spec_bandwidth(name: str) -> float | None:
    for key, gbps in SPEC_GBPS.items():
        if key in name:
            return float(gbps)
    return None


class Timer:
    """Median per-call time in us: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: str, iters: int) -> None:
        import torch

        self.torch, self.device, self.iters = torch, device, iters

    def __call__(self, fn: Callable[[], object]) -> float:
        torch = self.torch
        for _ in range(3):
            fn()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                for _ in range(self.iters):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / self.iters)
            return statistics.median(times)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(max(1, self.iters // 10)):
                fn()
            times.append((time.perf_counter() - t0) * 1e6 / max(1, self.iters // 10))
        return statistics.median(times)


def copy_bandwidth(device: str) -> float | None:
    """Measured device-to-device copy GB/s (read + write) over a 1 GiB buffer."""
    import torch

    if not device.startswith("cuda"):
        return None
    src = torch.empty(1 << 29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    us = Timer(device, 10)(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (us * 1e-6) / 1e9


def bench_kernels(device: str, dtype_name: str, smoke: bool, iters: int) -> dict[str, Any]:
    import torch

    from hotlora.kernels import build_slot_meta, lora_reference
    from hotlora.kernels.lora import _torch_apply
    from hotlora.kernels.triton_lora import sgmv_expand, sgmv_shrink

    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device="cpu").manual_seed(0)
    timer = Timer(device, iters)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    spec = spec_bandwidth(name)
    copy = copy_bandwidth(device)
    print(
        f"\n## SGMV kernels on {name}, {dtype_name}, S={S} slots, rank {R}; spec bandwidth "
        f"{spec or '?'} GB/s, measured copy {copy and round(copy)} GB/s\n"
    )
    print(
        "| scenario | target | shrink us | expand us | triton total us | GB/s | % spec | "
        "% copy | torch path us | gathered bmm us | triton speed-up vs torch |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    elt = torch.tensor([], dtype=dtype).element_size()
    for label, T, G in SMOKE_SCENARIOS if smoke else SCENARIOS:
        slot_ids = torch.randperm(S, generator=g)[:G]
        slots = slot_ids[torch.randint(0, G, (T,), generator=g)]  # (T,) mixed over G slots
        meta = build_slot_meta(slots, device)
        used = len(meta.seg_slots_host)
        for tname, d_in, d_out in SMOKE_SHAPES if smoke else SHAPES:
            x = torch.randn(T, d_in, generator=g).to(device, dtype)  # (T, d_in)
            y0 = torch.randn(T, d_out, generator=g).to(device, dtype)  # (T, d_out)
            A = (torch.randn(S, R, d_in, generator=g) / d_in**0.5).to(device, dtype)  # (S, R, d_in)
            B = (torch.randn(S, d_out, R, generator=g) * 0.1).to(device, dtype)  # (S, d_out, R)
            sc = torch.rand(S, generator=g).to(device, torch.float32)  # (S,)
            want = lora_reference(
                y0.double(), x.double(), A.double(), B.double(), sc.double(), slots.to(device)
            )
            y = y0.clone()
            sgmv_expand(y, sgmv_shrink(x, A, meta), B, sc, meta)
            err = (y.double() - want).abs().max().item()
            tol = 1e-2 * max(1.0, want.abs().max().item()) if elt < 4 else 1e-3
            if not err <= tol:
                raise SystemExit(f"{label} {tname}: Triton result off by {err} (tol {tol})")
            y_t = y0.clone()
            _torch_apply(y_t, x, A, B, sc, meta)
            if not (y_t.double() - want).abs().max().item() <= tol:
                raise SystemExit(f"{label} {tname}: torch path result wrong")

            buf = sgmv_shrink(x, A, meta)
            t_shrink = timer(functools.partial(sgmv_shrink, x, A, meta))
            t_expand = timer(functools.partial(sgmv_expand, y, buf, B, sc, meta))

            def triton_both(
                y: Any = y, x: Any = x, A: Any = A, B: Any = B, sc: Any = sc, meta: Any = meta
            ) -> None:
                sgmv_expand(y, sgmv_shrink(x, A, meta), B, sc, meta)

            t_total = timer(triton_both)
            t_torch = timer(functools.partial(_torch_apply, y, x, A, B, sc, meta))

            def gathered(
                y: Any = y,
                x: Any = x,
                A: Any = A,
                B: Any = B,
                sc: Any = sc,
                k: Any = meta.active_slots,
                idx: Any = meta.active_tokens,
            ) -> None:
                h = torch.bmm(x[idx].unsqueeze(1), A[k].transpose(1, 2)).squeeze(1)  # (N, R)
                h = h * sc[k].to(h.dtype)[:, None]
                y.index_add_(0, idx, torch.bmm(h.unsqueeze(1), B[k].transpose(1, 2)).squeeze(1))

            t_gather = timer(gathered)
            n = meta.num_active
            # Least traffic: x rows, the used A and B slices, y read + written, fp32 buf w + r.
            nbytes = (T * d_in + used * R * (d_in + d_out) + 2 * T * d_out) * elt + 2 * n * R * 4
            gbps = nbytes / (t_total * 1e-6) / 1e9
            row = {
                "scenario": label,
                "target": tname,
                "T": T,
                "slots": used,
                "d_in": d_in,
                "d_out": d_out,
                "bytes": nbytes,
                "shrink_us": t_shrink,
                "expand_us": t_expand,
                "triton_us": t_total,
                "gbps": gbps,
                "pct_spec": 100 * gbps / spec if spec else None,
                "pct_copy": 100 * gbps / copy if copy else None,
                "torch_us": t_torch,
                "gathered_us": t_gather,
                "max_err": err,
            }
            rows.append(row)
            pct = f"{row['pct_spec']:.1f}" if spec else "-"
            pcopy = f"{row['pct_copy']:.1f}" if copy else "-"
            print(
                f"| {label} | {tname} | {t_shrink:.1f} | {t_expand:.1f} | {t_total:.1f} | "
                f"{gbps:.0f} | {pct} | {pcopy} | {t_torch:.1f} | {t_gather:.1f} | "
                f"{t_torch / t_total:.2f}x |",
                flush=True,
            )
    return {"device": name, "dtype": dtype_name, "spec_gbps": spec, "copy_gbps": copy, "rows": rows}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--iters", type=int, default=50, help="calls per timed batch")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (code path check)")
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--dry-run", action="store_true", help="import and parse only, then exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    import torch

    import hotlora.kernels  # noqa: F401  (import check)

    if args.dry_run:
        print(
            f"bench_gpu_kernels: would run the kernel benchmark on {args.device} "
            f"({args.dtype}); cuda available: {torch.cuda.is_available()}"
        )
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu_kernels: no CUDA device (use --dry-run, or --smoke --device cpu)")
        return 2
    results: dict[str, Any] = {"machine": common.machine_info(), "torch": torch.__version__}
    t0 = time.perf_counter()
    results["kernels"] = bench_kernels(args.device, args.dtype, args.smoke, args.iters)
    results["seconds"] = time.perf_counter() - t0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
