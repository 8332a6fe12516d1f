"""Offline throughput: hotlora's mixed-adapter batches vs transformers + peft, in one run.

`--model gpt2-small` (default): GPT-2-small shapes (124M, random weights), rank-16 adapters on
c_attn/c_proj/c_fc. `--model smollm-135m`: SmolLM-135M shapes (Llama family: 30 layers, hidden
576, 9 heads / 3 KV heads, SwiGLU 1536, tied 49152-token embeddings; random weights), rank-16
adapters on every linear ("all-linear": q/k/v/o, gate/up/down). Both: batch 32, 32-token
prompts, 32 new greedy tokens, with 0, 1, 8 and 32 distinct adapters, in `--dtype` (fp32 by
default; peft's model is cast to the same dtype). Prints tokens/s for both (hotlora: best of 3
round-robin rounds over all its configurations) and the ratios.
The DEU columns serve 1, 8 and 32 distinct DEU adapters (every MLP neuron of every layer: the
GELU of GPT-2, the SiLU of the SwiGLU gate of Llama) and LoRA+DEU adapters (each LoRA above
plus a DEU part) from the same engine; peft has no DEU.
`--smoke` runs tiny shapes of the chosen family in seconds (CI checks the script works).

    python load_tests/bench_offline.py [--model gpt2-small|smollm-135m] [--smoke] [--skip-peft]
        [--dtype float32|float16|bfloat16] [--kinds lora deu] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hotlora.adapters.adapter import Adapter, save_adapter
from hotlora.adapters.demo_tasks import build_tokenizer
from hotlora.adapters.format import BaseShapes, load_lora_adapter
from hotlora.server.engine import Engine, EngineConfig, SamplingParams
from hotlora.server.engine.cuda_graphs import Capture
from hotlora.server.engine.loader import read_config

import common

TARGETS = ["c_attn", "c_proj", "c_fc"]
KINDS = ("lora", "deu", "lora+deu")
WORKLOAD = {"batch": 32, "prompt": 32, "new": 32}
SMOKE_WORKLOAD = {"batch": 8, "prompt": 8, "new": 4}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_NOTE = (
    "bf16 on this CPU has no native support (no AVX512-BF16 / AMX): figures are not "
    "representative"
)


@dataclass(frozen=True)
class BenchModel:
    """A base to benchmark: transformers classes, its shapes (full and --smoke), peft targets."""

    config_cls: str  # transformers config class
    model_cls: str  # transformers *ForCausalLM / *LMHeadModel class
    full: dict[str, int]  # config kwargs that set the shapes
    smoke: dict[str, int]
    targets: str | list[str]  # peft LoraConfig.target_modules
    fixed: dict[str, Any] = field(default_factory=dict)  # other config kwargs


MODELS = {
    "gpt2-small": BenchModel(
        "GPT2Config",
        "GPT2LMHeadModel",
        full={"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257},
        smoke={"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 300},
        targets=TARGETS,
        fixed={"n_positions": 256},
    ),
    "smollm-135m": BenchModel(
        "LlamaConfig",
        "LlamaForCausalLM",
        full={
            "num_hidden_layers": 30,
            "hidden_size": 576,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "intermediate_size": 1536,
            "vocab_size": 49152,
        },
        smoke={
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 96,
            "vocab_size": 300,
        },
        targets="all-linear",
        fixed={"tie_word_embeddings": True, "max_position_embeddings": 2048, "rope_theta": 10000},
    ),
}


def model_shape(model: BenchModel, smoke: bool) -> dict[str, int]:
    """The base's shape kwargs followed by the workload (batch, prompt, new)."""
    return {**(model.smoke if smoke else model.full), **(SMOKE_WORKLOAD if smoke else WORKLOAD)}


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, bool]:
    """Which of the CPU's bf16 instructions (AVX512-BF16, AMX-BF16) /proc/cpuinfo lists."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        lines = []
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return {f: f in flags for f in BF16_FLAGS}


def bf16_note(flags: dict[str, bool], dtype: str, cpu_runs: bool) -> str | None:
    """The caveat for a bf16 run on a CPU without native bf16, else None."""
    if dtype == "bfloat16" and cpu_runs and not any(flags.values()):
        return BF16_NOTE
    return None


def base_shapes(base_dir: Path) -> BaseShapes:
    """The shapes an adapter must fit, read from the saved base's config.json (any family)."""
    _, cfg = read_config(base_dir)
    return BaseShapes(cfg.n_layer, cfg.target_dims(), cfg.layout)


def build_deu(root: Path, lora_names: list[str], rank: int) -> list[str]:
    """One DEU adapter per LoRA adapter, and the two combined: d{i} and ld{i}."""
    base = base_shapes(root / "base")
    names = []
    for i, lora_name in enumerate(lora_names):
        deu = common.random_deu(
            base.n_layer, base.d_ff, seed=100 + i, gain=0.3, base_name="bench", layout=base.layout
        )
        lora = load_lora_adapter(root / lora_name, name=lora_name, base=base, max_rank=rank)
        save_adapter(root / f"d{i}", Adapter(f"d{i}", None, deu))
        save_adapter(root / f"ld{i}", Adapter(f"ld{i}", lora, deu))
        names += [f"d{i}", f"ld{i}"]
    return names


def build_base(root: Path, model: BenchModel, shape: dict[str, int]) -> Any:
    """A random base of `model`'s family saved in HF layout (+ the demo tokenizer)."""
    import transformers

    torch.manual_seed(0)
    kwargs = {k: v for k, v in shape.items() if k not in WORKLOAD}
    cfg = getattr(transformers, model.config_cls)(**kwargs, **model.fixed)
    base = getattr(transformers, model.model_cls)(cfg).eval()
    base.save_pretrained(root / "base", safe_serialization=True)
    build_tokenizer().save(str(root / "base" / "tokenizer.json"))
    return base


def build(
    root: Path, model: BenchModel, shape: dict[str, int], n_adapters: int, rank: int
) -> tuple[Any, list[str]]:
    """A random base saved in HF layout and n peft adapters with random non-zero weights."""
    from peft import LoraConfig, get_peft_model

    base = build_base(root, model, shape)
    names = []
    for i in range(n_adapters):
        lora_cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=model.targets)
        m = get_peft_model(copy.deepcopy(base), lora_cfg)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.02)
        m.save_pretrained(str(root / f"a{i}"))
        names.append(f"a{i}")
    return base, names


def row_adapters(names: list[str], distinct: int, batch: int) -> list[str | None]:
    if distinct == 0:
        return [None] * batch
    return [names[i % distinct] for i in range(batch)]


def make_engine(
    root: Path,
    names: dict[str, list[str]],
    shape: dict[str, int],
    rank: int,
    device: str = "cpu",
    dtype: str = "float32",
    graph_capture: Capture | None = None,
) -> Engine:
    """An engine on root/base sized for the workload, with every named adapter resident."""
    every = [n for kind_names in names.values() for n in kind_names]
    engine = Engine.from_pretrained(
        root / "base",
        EngineConfig(
            max_batch=shape["batch"],
            max_seq_len=shape["prompt"] + shape["new"] + 1,
            max_adapters=max(1, len(every)),
            max_rank=rank,
            device=device,
            dtype=dtype,
        ),
        graph_capture=graph_capture,
    )
    for n in every:
        engine.add_adapter(n, root / n)
    return engine


def bench_prompts(shape: dict[str, int]) -> list[list[int]]:
    """The workload's seeded random prompts (batch x prompt tokens)."""
    gen = torch.Generator().manual_seed(1)
    return [
        torch.randint(0, shape["vocab_size"], (shape["prompt"],), generator=gen).tolist()
        for _ in range(shape["batch"])
    ]


def bench_hotlora(
    engine: Engine,
    names: dict[str, list[str]],
    shape: dict[str, int],
    distincts: list[int],
    repeats: int,
) -> dict[str, dict[int, float]]:
    """tokens/s per adapter kind and number of distinct adapters in the batch (0 = base)."""
    prompts = bench_prompts(shape)
    params = SamplingParams(max_tokens=shape["new"], temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:2], params=params)  # warm-up
    runs = [(kind, d) for kind in names for d in distincts if d > 0 or kind == "lora"]
    best = dict.fromkeys(runs, float("inf"))
    # Round-robin, best of `repeats`: a slow spell on a shared machine then costs every
    # configuration a round instead of skewing one configuration's ratio.
    for _ in range(repeats):
        for kind, d in runs:
            t0 = time.perf_counter()
            res = engine.generate(prompts, row_adapters(names[kind], d, shape["batch"]), params)
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            best[(kind, d)] = min(best[(kind, d)], time.perf_counter() - t0)
            assert all(len(r.token_ids) == shape["new"] for r in res)
    out: dict[str, dict[int, float]] = {kind: {} for kind in names}
    for kind, d in runs:
        out[kind][d] = shape["batch"] * shape["new"] / best[(kind, d)]
        print(f"  hotlora  {kind:>8} {d:>2} adapters: {out[kind][d]:8.1f} tok/s", flush=True)
    for kind in names:  # the no-adapter run is the same for every kind
        out[kind][0] = out["lora"][0]
    return out


def bench_peft(
    root: Path,
    base: Any,
    names: list[str],
    shape: dict[str, int],
    distincts: list[int],
    repeats: int,
    dtype: str = "float32",
) -> dict[int, float]:
    """peft's tokens/s per number of distinct adapters, base and adapters cast to `dtype`."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, root / names[0], adapter_name=names[0]).eval()
    for n in names[1:]:
        model.load_adapter(root / n, adapter_name=n)
    # After loading: peft keeps adapter weights in fp32 on a half base (autocast_adapter_dtype);
    # casting the whole model runs peft in hotlora's dtype, LoRA included.
    model.to(getattr(torch, dtype))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["prompt"]), generator=gen)
    out = {}
    for d in distincts:
        rows = [a or "__base__" for a in row_adapters(names, d, shape["batch"])]
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                res = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    adapter_names=rows,
                    max_new_tokens=shape["new"],
                    min_new_tokens=shape["new"],
                    do_sample=False,
                    pad_token_id=0,
                )
            best = min(best, time.perf_counter() - t0)
        assert res.shape[1] == shape["prompt"] + shape["new"]
        out[d] = shape["batch"] * shape["new"] / best
        print(f"  peft     {d:>2} adapters: {out[d]:8.1f} tok/s", flush=True)
    return out


def print_tables(
    hot: dict[str, dict[int, float]], peft: dict[int, float], distincts: list[int]
) -> None:
    """hotlora vs peft (LoRA), then every hotlora kind against hotlora without adapters."""
    base_tps = hot["lora"][0]
    print("\n| distinct adapters | hotlora tok/s | peft tok/s | hotlora/peft | hotlora/hotlora@0 |")
    print("|---:|---:|---:|---:|---:|")
    for d in distincts:
        p = peft.get(d)
        ratio = f"{hot['lora'][d] / p:.2f}x" if p else "-"
        peft_col = f"{p:.1f}" if p else "-"
        tps = hot["lora"][d]
        print(f"| {d} | {tps:.1f} | {peft_col} | {ratio} | {tps / base_tps:.3f} |")
    if len(hot) > 1:
        kinds = [k for k in KINDS if k in hot]
        print(
            "\n| distinct adapters | " + " | ".join(f"{k} tok/s | {k}/none" for k in kinds) + " |"
        )
        print("|---:|" + "---:|---:|" * len(kinds))
        for d in distincts:
            cols = [f"{hot[k][d]:.1f} | {hot[k][d] / base_tps:.3f}" for k in kinds]
            print(f"| {d} | " + " | ".join(cols) + " |")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="gpt2-small", help="base shapes")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, seconds")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="cpu", help="hotlora's device (peft stays on the CPU)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    return ap


def build_kinds(
    root: Path, model: BenchModel, shape: dict[str, int], n: int, rank: int, kinds: list[str]
) -> tuple[Any, dict[str, list[str]]]:
    """The base and n adapters of every kind asked for (LoRA always: peft runs it)."""
    base, lora_names = build(root, model, shape, n, rank)
    names = {"lora": lora_names}
    if {"deu", "lora+deu"} & set(kinds):
        deu_names = build_deu(root, lora_names, rank)
        names |= {"deu": deu_names[0::2], "lora+deu": deu_names[1::2]}
    return base, {k: v for k, v in names.items() if k == "lora" or k in kinds}


def run(
    args: argparse.Namespace, shape: dict[str, int], distincts: list[int], repeats: int
) -> tuple[dict[str, dict[int, float]], dict[int, float]]:
    """Build the base and adapters in a temporary directory; hotlora's and peft's tok/s."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = MODELS[args.model]
        base, names = build_kinds(root, model, shape, max(distincts), args.rank, args.kinds)
        engine = make_engine(root, names, shape, args.rank, args.device, args.dtype)
        hot = bench_hotlora(engine, names, shape, distincts, repeats)
        if args.skip_peft:
            return hot, {}
        return hot, bench_peft(root, base, names["lora"], shape, distincts, repeats, args.dtype)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shape = model_shape(MODELS[args.model], args.smoke)
    distincts = [0, 1, 8] if args.smoke else [0, 1, 8, 32]
    flags = cpu_bf16_flags()
    note = bf16_note(flags, args.dtype, args.device == "cpu" or not args.skip_peft)
    print("cpu bf16: " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in flags.items()))
    if note:
        print(f"NOTE: {note}", flush=True)
    print(f"model {args.model}, dtype {args.dtype}, device {args.device}", flush=True)
    print(f"shape {shape}, rank {args.rank}, torch threads {torch.get_num_threads()}", flush=True)
    repeats = 1 if args.smoke else args.repeats
    hot, peft = run(args, shape, distincts, repeats)
    print_tables(hot, peft, distincts)
    if note:
        print(f"\nNOTE: {note}")
    if args.json:
        report = {"shape": shape, "hotlora": hot, "peft": peft, "model": args.model}
        report |= {"dtype": args.dtype, "device": args.device, "cpu_bf16": flags, "note": note}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
