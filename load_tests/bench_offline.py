"""Offline throughput: hotlora's mixed-adapter batches vs transformers + peft, in one run.

GPT-2-small shapes (124M, random weights, fp32), batch 32, 32-token prompts, 32 new greedy
tokens, with 0, 1, 8 and 32 distinct rank-16 adapters on c_attn/c_proj/c_fc. Prints tokens/s
for both (hotlora: best of 3 round-robin rounds over all its configurations) and the ratios.
The DEU columns serve 1, 8 and 32 distinct DEU adapters (every MLP neuron of every layer) and
LoRA+DEU adapters (each LoRA above plus a DEU part) from the same engine; peft has no DEU.
`--smoke` runs tiny shapes in seconds (CI checks the script works).

    python load_tests/bench_offline.py [--smoke] [--skip-peft] [--kinds lora deu] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from adapters.adapter import Adapter, save_adapter  # noqa: E402
from adapters.demo_tasks import build_tokenizer  # noqa: E402
from adapters.format import BaseShapes, load_lora_adapter  # noqa: E402
from server.engine import Engine, EngineConfig, SamplingParams  # noqa: E402

FULL = {
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "vocab_size": 50257,
    "batch": 32,
    "prompt": 32,
    "new": 32,
}
SMOKE = {
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "vocab_size": 300,
    "batch": 8,
    "prompt": 8,
    "new": 4,
}
TARGETS = ["c_attn", "c_proj", "c_fc"]
KINDS = ("lora", "deu", "lora+deu")


def build_deu(root: Path, shape: dict[str, int], lora_names: list[str], rank: int) -> list[str]:
    """One DEU adapter per LoRA adapter, and the two combined: d{i} and ld{i}."""
    base = BaseShapes.gpt2(shape["n_layer"], shape["n_embd"])
    names = []
    for i, lora_name in enumerate(lora_names):
        deu = common.random_deu(
            shape["n_layer"], base.d_ff, seed=100 + i, gain=0.3, base_name="bench"
        )
        lora = load_lora_adapter(root / lora_name, name=lora_name, base=base, max_rank=rank)
        save_adapter(root / f"d{i}", Adapter(f"d{i}", None, deu))
        save_adapter(root / f"ld{i}", Adapter(f"ld{i}", lora, deu))
        names += [f"d{i}", f"ld{i}"]
    return names


def build(root: Path, shape: dict[str, int], n_adapters: int, rank: int) -> tuple[Any, list[str]]:
    """A random base saved in HF layout and n peft adapters with random non-zero weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_embd=shape["n_embd"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        vocab_size=shape["vocab_size"],
        n_positions=256,
    )
    base = GPT2LMHeadModel(cfg).eval()
    base.save_pretrained(root / "base", safe_serialization=True)
    build_tokenizer().save(str(root / "base" / "tokenizer.json"))
    names = []
    for i in range(n_adapters):
        m = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
        )
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.02)
        m.save_pretrained(root / f"a{i}")
        names.append(f"a{i}")
    return base, names


def row_adapters(names: list[str], distinct: int, batch: int) -> list[str | None]:
    if distinct == 0:
        return [None] * batch
    return [names[i % distinct] for i in range(batch)]


def bench_hotlora(
    root: Path,
    names: dict[str, list[str]],
    shape: dict[str, int],
    rank: int,
    distincts: list[int],
    repeats: int,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, dict[int, float]]:
    """tokens/s per adapter kind and number of distinct adapters in the batch (0 = base)."""
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
    )
    for n in every:
        engine.add_adapter(n, root / n)
    gen = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, shape["vocab_size"], (shape["prompt"],), generator=gen).tolist()
        for _ in range(shape["batch"])
    ]
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
) -> dict[int, float]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, root / names[0], adapter_name=names[0]).eval()
    for n in names[1:]:
        model.load_adapter(root / n, adapter_name=n)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, seconds")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="cpu", help="hotlora's device (peft stays on the CPU)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    args = ap.parse_args(argv)
    shape = SMOKE if args.smoke else FULL
    distincts = [0, 1, 8] if args.smoke else [0, 1, 8, 32]
    n = max(distincts)
    print(f"shape {shape}, rank {args.rank}, torch threads {torch.get_num_threads()}", flush=True)
    repeats = 1 if args.smoke else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, lora_names = build(root, shape, n, args.rank)
        names = {"lora": lora_names}
        if {"deu", "lora+deu"} & set(args.kinds):
            deu_names = build_deu(root, shape, lora_names, args.rank)
            names |= {"deu": deu_names[0::2], "lora+deu": deu_names[1::2]}
        names = {k: v for k, v in names.items() if k == "lora" or k in args.kinds}
        hot = bench_hotlora(
            root, names, shape, args.rank, distincts, repeats, args.device, args.dtype
        )
        peft = (
            {} if args.skip_peft else bench_peft(root, base, lora_names, shape, distincts, repeats)
        )
    base_tps = hot["lora"][0]
    print("\n| distinct adapters | hotlora tok/s | peft tok/s | hotlora/peft | hotlora/hotlora@0 |")
    print("|---:|---:|---:|---:|---:|")
    for d in distincts:
        p = peft.get(d)
        ratio = f"{hot['lora'][d] / p:.2f}x" if p else "-"
        peft_col = f"{p:.1f}" if p else "-"
        tps = hot["lora"][d]
        print(f"| {d} | {tps:.1f} | {peft_col} | {ratio} | {tps / base_tps:.3f} |")
    if len(names) > 1:
        kinds = [k for k in KINDS if k in names]
        print(
            "\n| distinct adapters | " + " | ".join(f"{k} tok/s | {k}/none" for k in kinds) + " |"
        )
        print("|---:|" + "---:|---:|" * len(kinds))
        for d in distincts:
            cols = [f"{hot[k][d]:.1f} | {hot[k][d] / base_tps:.3f}" for k in kinds]
            print(f"| {d} | " + " | ".join(cols) + " |")
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "hotlora": hot, "peft": peft}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
