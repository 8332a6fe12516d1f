"""CPU timings of lora_apply's torch path vs the naive options, GPT-2-small shapes, fp32.

Per call:  each scenario x target shape; the chosen plan (what build_slot_meta picks), every
           other plan forced, and naive baselines. Weights are reused, so this is cache-warm.
Per step:  12 layers x 3 targets with distinct weights per layer (cache-cold, like the engine),
           against the step's 48 base linears of the same layers.

Times are the best of several batches (robust to other processes on a shared machine).
Run:  python load_tests/bench_kernels.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hotlora.kernels import SlotMeta, build_slot_meta, lora_apply

S = 64  # resident slots
R = 16
LAYERS = 12
SHAPES = [
    ("c_attn 768->2304", 768, 2304),
    ("attn.c_proj 768->768", 768, 768),
    ("mlp.c_fc 768->3072", 768, 3072),
]
# (name, T, distinct slots, layout): "mixed" = each slot's tokens scattered over the batch,
# "runs" = each sequence's tokens contiguous (how prefill batches arrive).
SCENARIOS = [
    ("decode T=32, 1 slot", 32, 1, "mixed"),
    ("decode T=32, 8 slots", 32, 8, "mixed"),
    ("decode T=32, 32 slots", 32, 32, "mixed"),
    ("prefill T=1024, 4 seqs", 1024, 4, "runs"),
    ("prefill T=1024, 4 slots mixed", 1024, 4, "mixed"),
]
PLANS = ("runs", "segments", "gathered")
# "standard": A, B contiguous as (S, R, d_in), (S, d_out, R); "transposed": stored as
# (S, d_in, R), (S, R, d_out) and passed as transposed views (same logical shapes).
STORAGES = ("standard", "transposed")


@dataclass
class Call:
    y: Tensor  # (T, d_out)
    x: Tensor  # (T, d_in)
    A: Tensor  # (S, R, d_in)
    B: Tensor  # (S, d_out, R)
    s: Tensor  # (S,)
    meta: SlotMeta
    slots: list[int]
    offs: Tensor  # (max_slot+1,) int32 group ends, for grouped_mm


def transposed_storage(W: Tensor) -> Tensor:
    """Same logical (S, m, n) tensor, stored as (S, n, m) (the layout GPT-2's Conv1D uses)."""
    return W.transpose(1, 2).contiguous().transpose(1, 2)


def make_slots(T: int, G: int, layout: str, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(S, generator=g)[:G].tolist()
    slots = [ids[i * G // T] for i in range(T)]  # contiguous blocks of T/G tokens
    if layout == "mixed":
        slots = [slots[i] for i in torch.randperm(T, generator=g).tolist()]
    return slots


def best_us(fn: Callable[[], object], budget_s: float, batches: int = 7) -> float:
    """Best per-call time (us) over `batches` timed batches after warm-up."""
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    n = max(1, int(budget_s / batches / max((time.perf_counter() - t0) / 3, 1e-6)))
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def run_chosen(c: Call) -> None:  # the plan build_slot_meta picked for this storage
    lora_apply(c.y, c.x, c.A, c.B, c.s, c.meta)


def run_plan(c: Call, plan: str) -> None:
    lora_apply(c.y, c.x, c.A, c.B, c.s, c.meta.with_cpu_plan(plan))  # type: ignore[arg-type]


def naive_loop(c: Call) -> None:
    """Per-token Python loop: y[t] += s[k] * B[k] @ (A[k] @ x[t])."""
    for t, k in enumerate(c.slots):
        if k >= 0:
            c.y[t] += c.s[k] * (c.B[k] @ (c.A[k] @ c.x[t]))


def naive_einsum(c: Call) -> None:
    """Fancy-index per-token weights, two einsums, index_add: the obvious vectorised version."""
    idx, k = c.meta.active_tokens, c.meta.active_slots
    h = torch.einsum("td,trd->tr", c.x[idx], c.A[k]) * c.s[k][:, None]  # (N, R)
    c.y.index_add_(0, idx, torch.einsum("tr,tor->to", h, c.B[k]))


def grouped_mm(c: Call) -> None:
    """torch._grouped_mm over slots 0..max_slot (idle slots are empty groups: no weight copy)."""
    m, hi = c.meta, c.meta.max_slot + 1
    xs = c.x.index_select(0, m.sorted_tokens)  # (N, d_in)
    h = torch._grouped_mm(xs, c.A[:hi].transpose(1, 2), offs=c.offs)  # (N, R)
    h.mul_(c.s.index_select(0, m.token_slots.index_select(0, m.sorted_tokens))[:, None])
    delta = torch._grouped_mm(h, c.B[:hi].transpose(1, 2), offs=c.offs)  # (N, d_out)
    c.y.index_add_(0, m.sorted_tokens, delta)


METHODS: dict[str, Callable[[Call], None]] = {
    "chosen": run_chosen,
    **{p: functools.partial(run_plan, plan=p) for p in PLANS},
    "loop": naive_loop,
    "einsum": naive_einsum,
}
if hasattr(torch, "_grouped_mm"):
    METHODS["grouped_mm"] = grouped_mm


def bench_calls(budget_s: float) -> None:
    g = torch.Generator().manual_seed(0)
    print(f"\n## Per call, fp32, S={S} resident slots, R={R}: us (ratio to chosen)\n")
    cols = list(METHODS)
    print(f"| scenario | target | A/B storage | plan | {' | '.join(cols)} |")
    print("|" + "---|" * (len(cols) + 4))
    for name, T, G, layout in SCENARIOS:
        slots = make_slots(T, G, layout)
        meta = build_slot_meta(slots, "cpu")
        counts = torch.bincount(torch.tensor(slots)[meta.sorted_tokens])  # (max_slot+1,)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        for (tname, d_in, d_out), storage in itertools.product(SHAPES, STORAGES):
            A = torch.randn(S, R, d_in, generator=g) / d_in**0.5  # (S, R, d_in)
            B = torch.randn(S, d_out, R, generator=g) * 1e-3  # (S, d_out, R)
            if storage == "transposed":
                A, B = transposed_storage(A), transposed_storage(B)
            c = Call(
                y=torch.randn(T, d_out, generator=g),
                x=torch.randn(T, d_in, generator=g),
                A=A,
                B=B,
                s=torch.rand(S, generator=g),
                meta=meta,
                slots=slots,
                offs=offs,
            )
            t = {k: best_us(functools.partial(f, c), budget_s) for k, f in METHODS.items()}
            base = t["chosen"]
            cells = " | ".join(f"{t[k]:.0f} ({t[k] / base:.2f}x)" for k in cols)
            plan = meta.cpu_plan if storage == "standard" else meta.cpu_plan_rowwise
            print(f"| {name} | {tname} | {storage} | {plan} | {cells} |", flush=True)


def base_step(xs: dict[int, Tensor], ys: dict[int, Tensor], W: list[list[Tensor]]) -> None:
    """The 48 base linears of a GPT-2-small decode step (4 per layer)."""
    for layer in W:
        for w in layer:
            torch.nn.functional.linear(xs[w.shape[1]], w, out=ys[w.shape[0]])


def lora_step(
    xs: dict[int, Tensor], ys: dict[int, Tensor], AB: list[list[tuple[Tensor, Tensor]]],
    s: Tensor, meta: SlotMeta,
) -> None:  # fmt: skip
    """The 36 adapter calls of a decode step (c_attn, attn.c_proj, mlp.c_fc per layer)."""
    for layer in AB:
        for A, B in layer:
            lora_apply(ys[B.shape[1]], xs[A.shape[2]], A, B, s, meta)


def bench_step(budget_s: float) -> None:
    g = torch.Generator().manual_seed(1)
    print(f"\n## Per decode step: {LAYERS} layers x 3 targets, distinct weights per layer\n")
    lin = [(i, o) for _, i, o in SHAPES] + [(3072, 768)]  # + mlp.c_proj (no adapter)
    W = [[torch.randn(o, i, generator=g) * 0.02 for i, o in lin] for _ in range(LAYERS)]
    AB_std = [
        [
            (torch.randn(S, R, i, generator=g) * 0.02, torch.randn(S, o, R, generator=g) * 1e-3)
            for _, i, o in SHAPES
        ]
        for _ in range(LAYERS)
    ]
    AB_t = [[(transposed_storage(A), transposed_storage(B)) for A, B in lab] for lab in AB_std]
    s = torch.rand(S, generator=g)  # (S,)
    plan_cols = " | ".join(f"LoRA ms ({p})" for p in PLANS)
    print(f"| scenario | A/B storage | plan | base linears ms | LoRA ms | LoRA / linears "
          f"| {plan_cols} |")  # fmt: skip
    print("|" + "---|" * (6 + len(PLANS)))
    for name, T, G, layout in SCENARIOS[:3]:
        slots = make_slots(T, G, layout)
        meta = build_slot_meta(slots, "cpu")
        xs = {i: torch.randn(T, i, generator=g) for i in (768, 3072)}  # (T, d_in)
        ys = {o: torch.randn(T, o, generator=g) for o in (768, 2304, 3072)}  # (T, d_out)
        t_base = best_us(functools.partial(base_step, xs, ys, W), budget_s * 3, 5) / 1e3
        for storage, AB in (("standard", AB_std), ("transposed", AB_t)):
            t = {
                p: best_us(
                    functools.partial(lora_step, xs, ys, AB, s, meta.with_cpu_plan(p)),
                    budget_s * 3,
                    5,
                )
                / 1e3
                for p in PLANS
            }
            plan = meta.cpu_plan if storage == "standard" else meta.cpu_plan_rowwise
            plans = " | ".join(f"{t[p]:.2f}" for p in PLANS)
            print(f"| {name} | {storage} | {plan} | {t_base:.1f} | {t[plan]:.2f} | "
                  f"{t[plan] / t_base:.1%} | {plans} |", flush=True)  # fmt: skip
    t_meta = best_us(functools.partial(build_slot_meta, make_slots(32, 32, "mixed"), "cpu"), 0.2)
    print(f"\nbuild_slot_meta (T=32, 32 slots, once per step): {t_meta:.0f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="shorter timing budget per cell")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = 0.2 if args.quick else 0.8
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_calls(budget)
    bench_step(budget)


if __name__ == "__main__":
    main()
