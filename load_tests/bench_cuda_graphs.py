"""Decode steps replayed from CUDA graphs against the same steps launched eagerly, in one run.

For each base (`--models`: GPT-2-small and SmolLM-135M shapes, random weights), batch
(`--batches`) and adapter mix (no adapter; `--adapters` distinct rank-16 LoRA adapters; as many
LoRA+DEU ones): the median decode step (32-token prompts, greedy) of one engine with its graphs
and then with them switched off, and the ratio. Needs CUDA (`--dtype`, default bfloat16).

`--smoke` runs tiny shapes on the CPU through the graph path with a capture that replays by
calling: it checks that the script and the graph path run, not speed (tests/engine/
test_cuda_graphs.py checks that graph decode equals eager decode).

    python load_tests/bench_cuda_graphs.py [--models gpt2-small smollm-135m]
        [--batches 1 8 32] [--adapters 32] [--dtype bfloat16] [--smoke] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import bench_offline as bo
import bench_roofline as br
import torch

from hotlora.server.engine.cuda_graphs import Capture, replay_by_calling


def run_model(name: str, args: argparse.Namespace, device: str) -> list[dict[str, object]]:
    """Rows of (batch, adapters, eager ms, graph ms, speedup) for one base."""
    model = bo.MODELS[name]
    shape = {**bo.model_shape(model, args.smoke), "batch": max(args.batches)}
    shape["new"] = max(shape["new"], br.STEP_TOKENS)
    capture: Capture | None = replay_by_calling if device == "cpu" else None
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = args.adapters
        _, names = bo.build_kinds(root, model, shape, n, 16, ["lora", "lora+deu"])
        engine = bo.make_engine(root, names, shape, 16, device, args.dtype, capture)
        graphs = engine.graphs
        if graphs is None:
            raise RuntimeError("the engine captured no graphs (config.cuda_graphs off?)")
        prompts = bo.bench_prompts(shape)
        for batch in args.batches:
            for kind, distinct in (("none", 0), ("lora", n), ("lora+deu", n)):
                adapters = bo.row_adapters(names.get(kind, []), distinct, batch)
                engine.graphs = graphs
                before = graphs.replays
                graph_s = br.decode_step_s(engine, prompts[:batch], adapters)
                if graphs.replays == before:
                    raise RuntimeError("no decode step was replayed from a graph")
                engine.graphs = None
                eager_s = br.decode_step_s(engine, prompts[:batch], adapters)
                row = {
                    "model": name,
                    "dtype": args.dtype,
                    "batch": batch,
                    "adapters": f"{distinct} {kind}" if distinct else "none",
                    "eager_ms": eager_s * 1e3,
                    "graph_ms": graph_s * 1e3,
                    "speedup": eager_s / graph_s,
                }
                rows.append(row)
                print(
                    f"{name:>12} {args.dtype:>9} batch {batch:>3} {row['adapters']:>14}: "
                    f"eager {row['eager_ms']:7.2f} ms  graphs {row['graph_ms']:7.2f} ms  "
                    f"x{row['speedup']:.2f}",
                    flush=True,
                )
        engine.graphs = graphs
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-small", "smollm-135m"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.adapters, args.dtype = [1, 3], 2, "float32"
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("bench_cuda_graphs.py: no CUDA device; run it on a GPU, or with --smoke")
        return 2
    if args.smoke:
        print("smoke: CPU, graphs replayed by calling the step (the times are not graph times)")
    rows = [r for name in args.models for r in run_model(name, args, device)]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
