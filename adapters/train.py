"""Train a LoRA adapter on a frozen hotlora base model and write it in PEFT format.

    python -m adapters.train --base adapters/demo/hotlora-demo --task reverse --out /tmp/reverse

Training runs the same GPT-2 definition the engine serves, with a differentiable LoRA hook
in place of the batched one; held-out accuracy is measured through the real `Engine`.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from adapters.demo_tasks import TASKS, Task, eos_id, example, heldout
from adapters.format import LoRAAdapter, LoRAModule, save_lora_adapter
from adapters.lora_config import LoRAConfig
from server.engine.config import ModelConfig
from server.engine.model import GPT2, TARGETS

log = logging.getLogger(__name__)


class TrainableLoRA(nn.Module):
    """A differentiable LoRA hook: y + (alpha / r) * (x @ A.T) @ B.T on the chosen targets."""

    def __init__(self, cfg: ModelConfig, rank: int, alpha: float, targets: tuple[str, ...]) -> None:
        super().__init__()
        dims = cfg.target_dims()
        self.rank, self.alpha, self.targets, self.scale = rank, alpha, targets, alpha / rank
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for layer in range(cfg.n_layer):
            for t in targets:
                d_in, d_out = dims[t]
                key = self.key(layer, TARGETS.index(t))
                self.A[key] = nn.Parameter(torch.randn(rank, d_in) / math.sqrt(d_in))  # (r, d_in)
                self.B[key] = nn.Parameter(
                    torch.zeros(d_out, rank)
                )  # (d_out, r): starts as identity

    @staticmethod
    def key(layer: int, target: int) -> str:
        return f"{layer}_{target}"

    def forward(self, layer: int, target: int, x: Tensor, y: Tensor) -> Tensor:
        key = self.key(layer, target)
        if key not in self.A:
            return y
        return y + self.scale * (x @ self.A[key].T) @ self.B[key].T  # (T, d_out)

    def to_adapter(self, name: str, base_name: str) -> LoRAAdapter:
        config = LoRAConfig.from_dict(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": self.rank,
                "lora_alpha": self.alpha,
                "target_modules": sorted(self.targets),
                "bias": "none",
                "fan_in_fan_out": True,
                "base_model_name_or_path": base_name,
            },
            adapter=name,
        )
        modules = []
        for key, a in self.A.items():
            layer, t = (int(v) for v in key.split("_"))
            modules.append(
                LoRAModule(
                    layer=layer,
                    target=TARGETS[t],
                    A=a.detach().float().contiguous(),
                    B=self.B[key].detach().float().contiguous(),
                    scaling=self.scale,
                )
            )
        modules.sort(key=lambda m: (m.layer, TARGETS.index(m.target)))
        return LoRAAdapter(name=name, config=config, modules=tuple(modules))


def batches(
    tokenizer_encode: Callable[[str], list[int]],
    tasks: list[Task],
    batch_size: int,
    eos_id: int,
    seed: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (input_ids (B, L), targets (B, L)) with the loss only on completion tokens."""
    rng = random.Random(seed)
    while True:
        rows = []
        for _ in range(batch_size):
            prompt, completion = example(rng.choice(tasks), rng)
            p, c = tokenizer_encode(prompt), tokenizer_encode(completion) + [eos_id]
            rows.append((p + c, [-100] * (len(p) - 1) + c + [-100]))
        L = max(len(ids) for ids, _ in rows)
        ids = torch.full((batch_size, L), eos_id)
        tgt = torch.full((batch_size, L), -100)
        for b, (i, t) in enumerate(rows):
            ids[b, : len(i)] = torch.tensor(i)
            tgt[b, : len(t)] = torch.tensor(t)
        yield ids, tgt


def fit(
    model: GPT2,
    params: list[nn.Parameter],
    data: Iterator[tuple[Tensor, Tensor]],
    steps: int,
    lr: float,
    lora: TrainableLoRA | None = None,
    desc: str = "train",
) -> float:
    """AdamW with linear warm-up and cosine decay; returns the final smoothed loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    smooth = float("nan")
    bar = tqdm(range(steps), desc=desc, file=sys.stderr, mininterval=2.0)
    for _ in bar:
        ids, tgt = next(data)
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        logits = model.logits(model(ids, pos, None, lora))  # (B, L, V)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        smooth = loss.item() if math.isnan(smooth) else 0.95 * smooth + 0.05 * loss.item()
        bar.set_postfix(loss=f"{smooth:.4f}")
    return smooth


def accuracy(base_dir: Path, adapter_dir: Path | None, task: Task, n: int = 200) -> float:
    """Greedy exact-match accuracy on held-out prompts, served by the real engine."""
    from server.engine import Engine, EngineConfig, SamplingParams

    engine = Engine.from_pretrained(
        base_dir, EngineConfig(max_batch=64, device="cpu", dtype="float32")
    )
    name = None
    if adapter_dir is not None:
        name = "eval"
        engine.add_adapter(name, adapter_dir)
    cases = heldout(task, n)
    outs = engine.generate(
        [p for p, _ in cases], [name] * n, SamplingParams(max_tokens=24, temperature=0.0)
    )
    return sum(o.text.strip() == want for o, (_, want) in zip(outs, cases, strict=True)) / n


def train_lora(
    base_dir: Path,
    task: Task,
    out: Path,
    rank: int = 8,
    alpha: float = 16.0,
    steps: int = 600,
    lr: float = 3e-3,
    batch_size: int = 32,
    targets: tuple[str, ...] = TARGETS,
    seed: int = 0,
) -> float:
    """Train, save in PEFT format, return held-out accuracy."""
    from server.engine.loader import load_gpt2
    from server.engine.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    model, cfg = load_gpt2(base_dir, torch.device("cpu"), torch.float32)
    tok = load_tokenizer(base_dir)
    lora = TrainableLoRA(cfg, rank, alpha, targets)
    data = batches(lambda s: tok.encode(s).ids, [task], batch_size, eos_id(tok), seed)
    t0 = time.perf_counter()
    loss = fit(model, list(lora.parameters()), data, steps, lr, lora, desc=f"lora:{task.name}")
    log.info("trained %s in %.0f s, final loss %.4f", task.name, time.perf_counter() - t0, loss)
    save_lora_adapter(out, lora.to_adapter(task.name, base_dir.name))
    return accuracy(base_dir, out, task)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="hotlora/HF GPT-2 model directory")
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--out", type=Path, required=True, help="adapter directory to write")
    ap.add_argument("--kind", choices=["lora"], default="lora")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    task = TASKS[args.task]
    acc = train_lora(
        args.base,
        task,
        args.out,
        args.rank,
        args.alpha,
        args.steps,
        args.lr,
        args.batch_size,
        seed=args.seed,
    )
    base_acc = accuracy(args.base, None, task)
    log.info(
        "%s: held-out greedy accuracy %.1f%% with the adapter, %.1f%% base alone",
        task.name,
        100 * acc,
        100 * base_acc,
    )


if __name__ == "__main__":
    main()
