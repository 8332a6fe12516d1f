"""Decode-step roofline: every measured decode step against the sum of its own base GEMMs.

For each base (`--models`: GPT-2-small and SmolLM-135M shapes, random weights) and dtype
(`--dtypes`), in one run:
  1. ideal: every base GEMM of one decode step (each layer's projection GEMMs as the forward
     runs them, a Llama's q/k/v and gate/up fused, then the LM head) timed in isolation at
     its exact shape, dtype and weight layout, in the order the step runs them (so each
     weight is read from memory as in the step), summed;
  2. measured: the median engine decode step at batch `--batch` (32-token prompts, greedy),
     with 0, 1, 8 and 32 distinct adapters of each kind (LoRA rank 16, DEU, LoRA+DEU);
  3. breakdown of that step from a torch.profiler pass: base GEMMs, LM head, attention (the
     KV-cache write and read plus the attention product), adapter ops, and the rest (step -
     the four above: embedding, norms, activations, residual adds, batch metadata, sampling);
  4. whole requests: hotlora's tokens/s over generate() (prefill included), and transformers +
     peft's (`generate(adapter_names=...)`) beside it, unless `--skip-peft`.
The CPU's bf16 support (AVX512-BF16 / AMX) is detected and printed; without it the bf16 rows
carry a note instead of a verdict on the targets. `--smoke` runs tiny shapes in seconds (CI).

    python load_tests/bench_roofline.py [--models gpt2-small smollm-135m]
        [--dtypes float32 bfloat16] [--kinds lora deu lora+deu] [--skip-peft] [--smoke]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import bench_offline as bo
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from hotlora.server.engine import Engine, SamplingParams
from hotlora.server.engine.models import base as model_base
from hotlora.server.engine.models import gpt2, llama

# Each round times every configuration (and the isolated GEMMs) once, round-robin; a figure is
# its best round, so a slow spell on a shared machine costs every configuration a round
# instead of skewing one configuration's ratio.
ROUNDS = 3
DECODE_STEPS = 8  # timed decode steps per configuration and round (their median counts)
PROFILED_STEPS = 4
STEP_TOKENS = max(DECODE_STEPS, PROFILED_STEPS) + 4  # each row's max_tokens while timing
GEMM_REPEATS = 3
GEMM_OPS = {"aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm"}
LABELS = {"lm_head": "hotlora::lm_head", "attention": "hotlora::attention"}
LABELS["adapter"] = "hotlora::adapter"
CATEGORIES = ("base", "lm_head", "attention", "adapter", "rest")


@dataclass
class StepRow:
    """One configuration's decode step, in milliseconds."""

    model: str
    dtype: str
    kind: str
    adapters: int
    step_ms: float
    ideal_ms: float  # sum of the step's isolated base GEMMs, LM head included
    base_ms: float  # breakdown (profiled): base projections
    lm_head_ms: float
    attention_ms: float
    adapter_ms: float
    rest_ms: float  # step_ms minus the four above
    adapter_floor_ms: float  # the adapter weights one step reads, at the measured bandwidth
    ops: float  # aten ops dispatched from Python per step (the bookkeeping's count)
    copies: float  # aten::copy_ per step (dtype or layout copies)
    tok_s: float  # whole requests (prefill included), hotlora
    peft_tok_s: float | None  # the same workload through transformers + peft (LoRA only)

    @property
    def x_ideal(self) -> float:
        return self.step_ms / self.ideal_ms


# ---------------------------------------------------------------------------- ideal


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def ideal_gemms(engine: Engine, batch: int) -> dict[str, float]:
    """Seconds of the step's base GEMMs run alone: 'base' (all projections) and 'lm_head'.

    Each repeat runs every projection of every layer in the step's order; each GEMM's time is
    its median over the repeats, so a preempted call does not count.
    """
    model, cfg = engine.model, engine.model_config
    sync = _sync(engine.device)
    make = {"device": engine.device, "dtype": engine.dtype}
    hidden = torch.randn(batch, next(iter(cfg.target_dims().values()))[0], **make)  # (B, d)
    calls: list[tuple[str, Callable[[], Any]]] = []
    for layer in range(cfg.n_layer):
        # The GEMMs the forward runs (a Llama's q/k/v and gate/up fused), each on its own x.
        for w, b in model.base_gemms(layer):
            x = torch.randn(batch, w.shape[1], **make)  # (B, d_in)
            calls.append(("base", lambda x=x, w=w, b=b: F.linear(x, w, b)))
    calls.append(("lm_head", lambda: model.logits(hidden)))
    times: list[list[float]] = [[] for _ in calls]
    with torch.inference_mode():
        for _ in range(GEMM_REPEATS + 1):  # the first round warms up
            for i, (_, fn) in enumerate(calls):
                times[i].append(_timed(fn, sync))
    out = dict.fromkeys(("base", "lm_head"), 0.0)
    for (cat, _), ts in zip(calls, times, strict=True):
        out[cat] += statistics.median(ts[1:])
    return out


# ---------------------------------------------------------------------------- measured


@contextmanager
def _running(
    engine: Engine, prompts: list[list[int]], adapters: list[str | None]
) -> Iterator[None]:
    """Prefill `prompts` (greedy, no EOS) so that every later engine.step() is a decode step."""
    params = SamplingParams(max_tokens=STEP_TOKENS, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, a, params) for p, a in zip(prompts, adapters, strict=True)]
    engine.step()  # one prefill admits every row
    if engine.num_waiting:
        raise RuntimeError("the prefill did not admit every row: raise max_batch")
    try:
        yield
    finally:
        for rid in ids:
            engine.abort_request(rid)


def decode_step_s(engine: Engine, prompts: list[list[int]], adapters: list[str | None]) -> float:
    """Median wall time of DECODE_STEPS decode steps of the whole batch."""
    sync = _sync(engine.device)
    with _running(engine, prompts, adapters):
        engine.step()  # warm-up
        times = [_timed(engine.step, sync) for _ in range(DECODE_STEPS)]
    return statistics.median(times)


class _LabelledHook:
    """The engine's adapter hook with every call inside a profiler range."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook

    def lora(self, *args: Any) -> Any:
        with record_function(LABELS["adapter"]):
            return self.hook.lora(*args)

    def activation(self, *args: Any) -> Any:
        with record_function(LABELS["adapter"]):
            return self.hook.activation(*args)


def _labelled(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


@contextmanager
def _labels(engine: Engine) -> Iterator[None]:
    """Profiler ranges around the LM head, attention (KV cache + attend) and the adapter hook,
    patched in for the profiled steps only."""
    hook, logits = engine._hook, engine.model.logits
    attention = model_base.cached_attention
    engine._hook = lambda step: None if (h := hook(step)) is None else _LabelledHook(h)  # type: ignore[method-assign]
    engine.model.logits = _labelled(logits, LABELS["lm_head"])  # type: ignore[method-assign]
    gpt2.cached_attention = llama.cached_attention = _labelled(attention, LABELS["attention"])
    try:
        yield
    finally:
        del engine._hook, engine.model.logits
        gpt2.cached_attention = llama.cached_attention = attention


def breakdown_s(
    engine: Engine, prompts: list[list[int]], adapters: list[str | None]
) -> dict[str, float]:
    """Seconds per decode step in base GEMMs, LM head, attention and adapter ops (profiled),
    and the step's op and copy counts ('ops', 'copies')."""
    with _running(engine, prompts, adapters), _labels(engine):
        engine.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(PROFILED_STEPS):
                engine.step()
    out = dict.fromkeys(CATEGORIES[:-1], 0.0)
    by_label = {v: k for k, v in LABELS.items()}
    ops = copies = 0
    for ev in prof.events():
        top = _top_level(ev, by_label)
        if ev.name in by_label:
            if not _inside_label(ev, by_label):
                out[by_label[ev.name]] += ev.cpu_time_total
        elif ev.name in GEMM_OPS and top:
            out["base"] += ev.cpu_time_total
        ops += ev.name.startswith("aten::") and top
        copies += ev.name == "aten::copy_"
    times = {k: v * 1e-6 / PROFILED_STEPS for k, v in out.items()}
    return times | {"ops": ops / PROFILED_STEPS, "copies": copies / PROFILED_STEPS}


def _inside_label(ev: Any, labels: dict[str, str]) -> bool:
    parent = ev.cpu_parent
    while parent is not None:
        if parent.name in labels:
            return True
        parent = parent.cpu_parent
    return False


def _top_level(ev: Any, labels: dict[str, str]) -> bool:
    """An op no other op encloses (labels are transparent): called from Python, so a GEMM
    inside F.linear counts once."""
    parent = ev.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


# ---------------------------------------------------------------------------- memory floor


def read_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Bytes per second one full read of a buffer larger than any cache takes (best of 5)."""
    buf = torch.ones(nbytes // 4, device=device)
    best = float("inf")
    for _ in range(6):
        best = min(best, _timed(buf.sum, _sync(device)))
    return nbytes / best


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def adapter_bytes(engine: Engine, kind: str, distinct: int) -> int:
    """Bytes of adapter weights one decode step must read: each distinct adapter's LoRA slot
    in every (layer, target) and its DEU planes in every layer (all covered, as benchmarked)."""
    total = 0
    if "lora" in kind:
        slots = engine.residents.lora
        for layer_a, layer_b in zip(slots.A, slots.B, strict=True):
            for a, b in zip(layer_a, layer_b, strict=True):
                total += (a[0].numel() + b[0].numel()) * a.element_size()
    if "deu" in kind:
        bank = engine.residents.deu.bank  # (L, P, S, d_ff)
        total += bank[:, :, 0].numel() * bank.element_size()
    return total * distinct


# ---------------------------------------------------------------------------- driver


def bench_model(
    model_name: str,
    dtype: str,
    kinds: list[str],
    batch: int,
    skip_peft: bool,
    smoke: bool,
    device: str = "cpu",
    repeats: int = 1,
) -> list[StepRow]:
    """Every configuration of one base and dtype. On CUDA the profiler's CPU times are launch
    times, so the breakdown is left out (NaN) and only step, ideal and tok/s are measured."""
    model = bo.MODELS[model_name]
    workload = {**bo.model_shape(model, smoke), "batch": batch}  # whole requests
    shape = {**workload, "new": max(workload["new"], STEP_TOKENS)}  # sizes the engine
    distincts = [d for d in (0, 1, 8, 32) if d <= batch]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, names = bo.build_kinds(root, model, shape, max(distincts), 16, kinds)
        engine = bo.make_engine(root, names, shape, 16, device, dtype)
        tok_s = bo.bench_hotlora(engine, names, workload, distincts, repeats)
        peft = {} if skip_peft else bo.bench_peft(
            root, base, names["lora"], workload, distincts, repeats, dtype
        )
        bandwidth = read_bandwidth(engine.device)
        print(f"  memory read bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
        prompts = bo.bench_prompts(shape)
        configs = [(kind, d) for kind in names for d in distincts if d > 0 or kind == "lora"]
        rows_of = {(kind, d): bo.row_adapters(names[kind], d, batch) for kind, d in configs}
        steps = dict.fromkeys(configs, float("inf"))
        ideal = dict.fromkeys(("base", "lm_head"), float("inf"))
        for _ in range(ROUNDS):
            gemms = ideal_gemms(engine, batch)
            ideal = {k: min(v, gemms[k]) for k, v in ideal.items()}
            for kind, d in configs:
                step = decode_step_s(engine, prompts, rows_of[(kind, d)])
                steps[(kind, d)] = min(steps[(kind, d)], step)
        rows = []
        for kind, d in configs:
            step = steps[(kind, d)]
            parts = (
                breakdown_s(engine, prompts, rows_of[(kind, d)])
                if engine.device.type == "cpu"
                else dict.fromkeys([*CATEGORIES[:-1], "ops", "copies"], float("nan"))
            )
            rest = step - sum(parts[c] for c in CATEGORIES[:-1])
            rest = max(0.0, rest) if rest == rest else rest  # NaN stays NaN
            floor = adapter_bytes(engine, kind, d) / bandwidth
            rows.append(
                StepRow(
                    model_name, dtype, kind, d, step * 1e3, sum(ideal.values()) * 1e3,
                    parts["base"] * 1e3, parts["lm_head"] * 1e3, parts["attention"] * 1e3,
                    parts["adapter"] * 1e3, rest * 1e3, floor * 1e3, parts["ops"],
                    parts["copies"], tok_s[kind][d],
                    peft.get(d) if kind == "lora" else None,
                )
            )
            print(f"  {kind:>8} {d:>2}: step {step * 1e3:.2f} ms", flush=True)
        print(
            f"  ideal: base GEMMs {ideal['base'] * 1e3:.2f} ms + LM head "
            f"{ideal['lm_head'] * 1e3:.2f} ms",
            flush=True,
        )
    return rows


def print_table(rows: list[StepRow], notes: dict[str, str | None]) -> None:
    none_ms = {(r.model, r.dtype): r.step_ms for r in rows if r.adapters == 0}
    print(
        "\n| model | dtype | kind | adapters | step ms | ideal ms | step/ideal | overhead "
        "| base | LM head | attention | adapter (floor) | rest | ops | copies | tok/s "
        "| peft tok/s | x peft |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        key = (r.model, r.dtype)
        over = r.step_ms / none_ms[key] - 1
        peft = f"{r.peft_tok_s:.1f}" if r.peft_tok_s else "-"
        ratio = f"{r.tok_s / r.peft_tok_s:.2f}x" if r.peft_tok_s else "-"
        kind = "none" if r.adapters == 0 else r.kind
        print(
            f"| {r.model} | {r.dtype} | {kind} | {r.adapters} | {r.step_ms:.2f} "
            f"| {r.ideal_ms:.2f} | {r.x_ideal:.2f}x | {over:+.1%} | {r.base_ms:.2f} "
            f"| {r.lm_head_ms:.2f} | {r.attention_ms:.2f} | {r.adapter_ms:.2f} "
            f"({r.adapter_floor_ms:.2f}) | {r.rest_ms:.2f} | {r.ops:.0f} | {r.copies:.0f} "
            f"| {r.tok_s:.1f} | {peft} | {ratio} |"
        )
    for dtype, note in notes.items():
        if note:
            print(f"\nNOTE ({dtype}): {note}; peft's {dtype} run is skipped")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(bo.MODELS), default=sorted(bo.MODELS))
    ap.add_argument(
        "--dtypes",
        nargs="+",
        choices=["float32", "float16", "bfloat16"],
        default=["float32", "bfloat16"],
    )
    ap.add_argument("--kinds", nargs="+", choices=bo.KINDS, default=list(bo.KINDS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--device", default="cpu", help="cuda: no breakdown, no peft")
    ap.add_argument("--repeats", type=int, default=1, help="whole-request runs (best of)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, seconds")
    ap.add_argument("--json", type=Path)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = bo.cpu_bf16_flags()
    notes = {d: bo.bf16_note(flags, d, cpu_runs=args.device == "cpu") for d in args.dtypes}
    print("cpu bf16: " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in flags.items()))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    rows: list[StepRow] = []
    for model in args.models:
        for dtype in args.dtypes:
            print(f"{model} {dtype}:", flush=True)
            # peft runs on the CPU only; without native bf16 its GPT-2 (Conv1D, x @ W[in, out])
            # takes minutes per bf16 decode step there, and its figure would say nothing.
            skip_peft = args.skip_peft or args.device != "cpu" or notes[dtype] is not None
            rows += bench_model(
                model, dtype, args.kinds, args.batch, skip_peft, args.smoke, args.device,
                args.repeats,
            )
    print_table(rows, notes)
    if args.json:
        report = {"cpu_bf16": flags, "notes": notes, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
