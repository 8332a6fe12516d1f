"""Is a DEU adapter worth serving? Train DEU, LoRA at a similar size, and LoRA+DEU per task.

    python -m hotlora.training.deu_study                      # upper and sort, ~15 min, 2 cores
    python -m hotlora.training.deu_study --tasks upper --ship # also copy the best DEU to the demo

Prints a markdown table (trainable parameters, training seconds, held-out greedy accuracy
served by the engine) and plots learned activation shapes next to GELU (needs matplotlib).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from hotlora.adapters.adapter import load_adapter
from hotlora.adapters.demo_tasks import DEMO_ADAPTERS, DEMO_MODEL, TASKS
from hotlora.adapters.format import BaseShapes
from hotlora.kernels.deu import deu_activation
from hotlora.server.engine.loader import read_config
from hotlora.training.train import TrainResult, accuracy, train_adapter

log = logging.getLogger(__name__)

# (label, train_adapter kwargs). On the demo model one DEU parameter set per MLP neuron is 12,288
# parameters; LoRA on all four targets is 8,192 per rank: ranks 1-3 bracket DEU and LoRA+DEU.
RUNS: tuple[tuple[str, dict[str, object]], ...] = (
    ("DEU", {"kind": "deu", "deu_lr": 0.01, "gain_lr": 0.03}),
    ("LoRA r=1", {"kind": "lora", "rank": 1, "alpha": 2.0}),
    ("LoRA r=2", {"kind": "lora", "rank": 2, "alpha": 4.0}),
    ("LoRA r=3", {"kind": "lora", "rank": 3, "alpha": 6.0}),
    ("LoRA+DEU", {"kind": "lora+deu", "rank": 1, "alpha": 2.0, "deu_lr": 0.01, "gain_lr": 0.03}),
)
SHIPPED_NAME = "{task}-deu"


def study(tasks: list[str], out: Path, steps: int) -> dict[tuple[str, str], TrainResult]:
    results = {}
    for task in tasks:
        for label, kwargs in RUNS:
            path = out / f"{task}-{label.lower().replace(' ', '').replace('=', '')}"
            results[(task, label)] = train_adapter(
                DEMO_MODEL,
                TASKS[task],
                path,
                steps=steps,
                **kwargs,  # type: ignore[arg-type]
            )
    return results


def table(results: dict[tuple[str, str], TrainResult], base: dict[str, float]) -> str:
    lines = [
        "| task | adapter | trainable params | train time | held-out accuracy |",
        "|---|---|---:|---:|---:|",
    ]
    for task, b in base.items():
        lines.append(f"| {task} | none (base) | 0 | - | {100 * b:.1f}% |")
        for (t, label), r in results.items():
            if t == task:
                lines.append(
                    f"| {task} | {label} | {r.trainable_params:,} | {r.seconds:.0f} s "
                    f"| {100 * r.accuracy:.1f}% |"
                )
    return "\n".join(lines)


def plot_shapes(adapter_dir: Path, png: Path, n: int = 6) -> None:
    """The n neurons with the largest |gain| of every adapted layer: GELU and GELU + g * D."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, cfg = read_config(DEMO_MODEL)
    shapes = BaseShapes(cfg.n_layer, cfg.target_dims(), cfg.layout)
    deu = load_adapter(adapter_dir, name="plot", base=shapes, max_rank=64).deu
    assert deu is not None
    x = torch.linspace(-6, 6, 601)  # (X,)
    gelu = torch.nn.functional.gelu(x, approximate="tanh")  # (X,)
    layers = deu.config.layers
    fig, axes = plt.subplots(len(layers), n, figsize=(2.2 * n, 2.0 * len(layers)), sharex=True)
    for row, layer in enumerate(layers):
        p = deu.neuron_params(layer)  # (6, d_ff)
        top = p[5].abs().argsort(descending=True)[:n]
        for col, j in enumerate(top.tolist()):
            ax = axes[row][col]
            y = gelu + deu_activation(x[:, None], p[:, j : j + 1])[:, 0]  # (X,)
            ax.plot(x, gelu, color="0.6", lw=1, label="GELU")
            ax.plot(x, y, color="C3", lw=1.4, label="GELU + g·D")
            ax.set_title(f"layer {layer}, neuron {j}", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Learned DEU activations ({adapter_dir.name}): largest |gain| per layer")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["upper", "sort"], choices=sorted(TASKS))
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--ship", action="store_true", help="copy the best DEU into the demo assets")
    ap.add_argument("--plot", type=Path, default=Path("load_tests/results/deu_shapes.png"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        results = study(args.tasks, out, args.steps)
        base = {t: accuracy(DEMO_MODEL, None, TASKS[t]) for t in args.tasks}
        log.info("\n%s", table(results, base))
        task = max(args.tasks, key=lambda t: results[(t, "DEU")].accuracy)
        best = out / f"{task}-deu"
        plot_shapes(best, args.plot)
        log.info("plotted %s's shapes to %s", best.name, args.plot)
        if args.ship:
            dest = DEMO_ADAPTERS / SHIPPED_NAME.format(task=task)
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(best, dest)
            log.info(
                "shipped %s (%.1f%%) as %s", best.name, 100 * results[(task, "DEU")].accuracy, dest
            )


if __name__ == "__main__":
    main()
