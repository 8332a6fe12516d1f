"""Train a LoRA, DEU or LoRA+DEU adapter on a frozen hotlora base model and write it.

    python -m hotlora.training.train --base adapters/demo/hotlora-demo --task reverse --out /tmp/r
    python -m hotlora.training.train --base adapters/demo/hotlora-demo --task upper --kind deu \
        --out /tmp/u

Training runs the same GPT-2 definition the engine serves, with a differentiable adapter hook
in place of the batched one; held-out accuracy is measured through the real `Engine`. LoRA is
written in PEFT's format, DEU and LoRA+DEU in hotlora's (adapters/deu_format.py).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from hotlora.adapters.adapter import Adapter, Kind, save_adapter
from hotlora.adapters.demo_tasks import TASKS, Task, eos_id, example, heldout
from hotlora.adapters.deu_format import DEUAdapter, DEUConfig
from hotlora.adapters.format import LoRAAdapter, LoRAModule
from hotlora.adapters.lora_config import LoRAConfig
from hotlora.kernels.deu import deu_activation
from hotlora.server.engine.models import CausalLM, ModelSpec

log = logging.getLogger(__name__)


class TrainableLoRA(nn.Module):
    """A differentiable LoRA hook: y + (alpha / r) * (x @ A.T) @ B.T on the chosen targets.

    With `all_linear` the config says "all-linear" (PEFT's every-projection shorthand)."""

    def __init__(
        self, cfg: ModelSpec, rank: int, alpha: float, targets: tuple[str, ...],
        all_linear: bool = False,
    ) -> None:
        super().__init__()
        dims = cfg.target_dims()
        self.layout, self.order = cfg.layout, tuple(dims)
        unknown = sorted(set(targets) - set(self.order))
        if unknown or not targets:
            raise ValueError(f"LoRA targets {unknown or targets} are not among {self.order}")
        if all_linear:
            targets = self.order
        self.rank, self.alpha, self.targets, self.scale = rank, alpha, targets, alpha / rank
        self.all_linear = all_linear
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for layer in range(cfg.n_layer):
            for t in targets:
                d_in, d_out = dims[t]
                key = self.key(layer, self.order.index(t))
                self.A[key] = nn.Parameter(torch.randn(rank, d_in) / math.sqrt(d_in))  # (r, d_in)
                self.B[key] = nn.Parameter(
                    torch.zeros(d_out, rank)
                )  # (d_out, r): starts as identity

    @staticmethod
    def key(layer: int, target: int) -> str:
        return f"{layer}_{target}"

    def lora(self, layer: int, target: int, x: Tensor, y: Tensor) -> Tensor:
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
                "target_modules": "all-linear" if self.all_linear else sorted(self.targets),
                "bias": "none",
                "fan_in_fan_out": self.layout.fan_in_fan_out,
                "base_model_name_or_path": base_name,
            },
            adapter=name,
            layout=self.layout,
        )
        modules = []
        for key, a in self.A.items():
            layer, t = (int(v) for v in key.split("_"))
            modules.append(
                LoRAModule(
                    layer=layer,
                    target=self.order[t],
                    A=a.detach().float().contiguous(),
                    B=self.B[key].detach().float().contiguous(),
                    scaling=self.scale,
                )
            )
        modules.sort(key=lambda m: (m.layer, self.order.index(m.target)))
        return LoRAAdapter(name=name, config=config, modules=tuple(modules))


class TrainableDEU(nn.Module):
    """Differentiable DEU activations: act(h) + g * D(h) per neuron group, on chosen layers.

    a, b, c are softplus of raw parameters (positive: a stable system) initialised like the
    paper's U(0, 1); c1 = c2 = 0; the gain starts at 0, so training starts from the base model.
    """

    def __init__(self, cfg: ModelSpec, layers: tuple[int, ...], group_size: int = 1) -> None:
        super().__init__()
        if cfg.d_ff % group_size:
            raise ValueError(f"group_size {group_size} does not divide d_ff {cfg.d_ff}")
        self.layers, self.group_size, self.layout = layers, group_size, cfg.layout
        groups = cfg.d_ff // group_size
        self.raw = nn.ParameterDict()  # layer -> (3, G): softplus^-1 of a, b, c
        self.free = nn.ParameterDict()  # layer -> (2, G): c1, c2
        self.gain = nn.ParameterDict()  # layer -> (G,)
        for layer in layers:
            abc = torch.rand(3, groups) * 0.9 + 0.1  # (3, G) in (0.1, 1)
            self.raw[str(layer)] = nn.Parameter(abc.expm1().log())
            self.free[str(layer)] = nn.Parameter(torch.zeros(2, groups))
            self.gain[str(layer)] = nn.Parameter(torch.zeros(groups))

    def params(self, layer: int) -> Tensor:
        """(6, G): a, b, c, c1, c2, gain."""
        key = str(layer)
        abc = nn.functional.softplus(self.raw[key]) + 1e-6  # (3, G), > 0 even on underflow
        return torch.cat([abc, self.free[key], self.gain[key][None]])

    def shape_parameters(self) -> list[nn.Parameter]:
        return [*self.raw.values(), *self.free.values()]

    def activation(self, layer: int, h: Tensor, y: Tensor) -> Tensor:
        if str(layer) not in self.raw:
            return y
        p = self.params(layer).repeat_interleave(self.group_size, dim=1)  # (6, d_ff)
        return y + deu_activation(h, p)

    def to_adapter(self, base_name: str) -> DEUAdapter:
        # A LoRA part's config is written by save_adapter from the LoRA part itself.
        config = DEUConfig(self.layers, self.group_size, base_name, layout=self.layout)
        return DEUAdapter(
            config,
            {layer: self.params(layer).detach().float().contiguous() for layer in self.layers},
        )


class TrainableAdapter(nn.Module):
    """The training hook: a LoRA part, a DEU part, or both (the model calls both methods)."""

    def __init__(self, lora: TrainableLoRA | None, deu: TrainableDEU | None) -> None:
        super().__init__()
        self.lora_part, self.deu_part = lora, deu

    def lora(self, layer: int, target: int, x: Tensor, y: Tensor) -> Tensor:
        return y if self.lora_part is None else self.lora_part.lora(layer, target, x, y)

    def activation(self, layer: int, h: Tensor, y: Tensor) -> Tensor:
        return y if self.deu_part is None else self.deu_part.activation(layer, h, y)

    def param_groups(self, lr: float, deu_lr: float, gain_lr: float) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = []
        if self.lora_part is not None:
            groups.append({"params": list(self.lora_part.parameters()), "lr": lr})
        if self.deu_part is not None:
            groups.append({"params": self.deu_part.shape_parameters(), "lr": deu_lr})
            groups.append({"params": list(self.deu_part.gain.values()), "lr": gain_lr})
        return groups

    def to_adapter(self, name: str, base_name: str) -> Adapter:
        lora = None if self.lora_part is None else self.lora_part.to_adapter(name, base_name)
        deu = None if self.deu_part is None else self.deu_part.to_adapter(base_name)
        return Adapter(name, lora, deu)


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
    model: CausalLM,
    groups: list[dict[str, Any]],
    data: Iterator[tuple[Tensor, Tensor]],
    steps: int,
    hook: TrainableAdapter | None = None,
    desc: str = "train",
) -> float:
    """AdamW (one learning rate per group) with linear warm-up and cosine decay.

    Returns the final smoothed loss.
    """
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
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
        logits = model.logits(model(ids, pos, None, hook))  # (B, L, V)
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
    from hotlora.server.engine import Engine, EngineConfig, SamplingParams

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


@dataclass(frozen=True)
class TrainResult:
    kind: Kind
    trainable_params: int
    seconds: float  # training only, not the accuracy evaluation
    final_loss: float
    accuracy: float  # held-out greedy exact match, served by the engine


def train_adapter(
    base_dir: Path,
    task: Task,
    out: Path,
    kind: Kind = "lora",
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] | None = None,  # None: every target of the family
    all_linear: bool = False,
    layers: tuple[int, ...] | None = None,
    group_size: int = 1,
    steps: int = 600,
    lr: float = 3e-3,
    deu_lr: float = 1e-2,
    gain_lr: float = 1e-2,
    batch_size: int = 32,
    seed: int = 0,
) -> TrainResult:
    """Train an adapter of `kind` on `task`, write it to `out`, measure held-out accuracy."""
    from hotlora.server.engine.loader import load_model
    from hotlora.server.engine.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    model, cfg = load_model(base_dir, torch.device("cpu"), torch.float32)
    tok = load_tokenizer(base_dir)
    lora = None
    if kind != "deu":
        lora = TrainableLoRA(cfg, rank, alpha, targets or tuple(cfg.target_dims()), all_linear)
    deu = None
    if kind != "lora":
        deu = TrainableDEU(cfg, tuple(range(cfg.n_layer)) if layers is None else layers, group_size)
    hook = TrainableAdapter(lora, deu)
    groups = hook.param_groups(lr, deu_lr, gain_lr)
    n_params = sum(p.numel() for g in groups for p in g["params"])
    data = batches(tok.encode, [task], batch_size, eos_id(tok.raw), seed)
    t0 = time.perf_counter()
    loss = fit(model, groups, data, steps, hook, desc=f"{kind}:{task.name}")
    seconds = time.perf_counter() - t0
    log.info(
        "trained %s %s (%d params) in %.0f s, final loss %.4f",
        kind,
        task.name,
        n_params,
        seconds,
        loss,
    )
    save_adapter(out, hook.to_adapter(task.name, base_dir.name))
    return TrainResult(kind, n_params, seconds, loss, accuracy(base_dir, out, task))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="a GPT-2 or Llama-family model dir")
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--out", type=Path, required=True, help="adapter directory to write")
    ap.add_argument("--kind", choices=["lora", "deu", "lora+deu"], default="lora")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    ap.add_argument(
        "--targets", nargs="+",
        help="LoRA targets, e.g. attn.c_attn (GPT-2) or self_attn.q_proj (Llama); 'all-linear' "
        "for every projection; default: every projection, listed by name",
    )
    ap.add_argument("--layers", type=int, nargs="+", help="DEU layers (default: all)")
    ap.add_argument("--group-size", type=int, default=1, help="DEU neurons per parameter set")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-3, help="LoRA learning rate")
    ap.add_argument("--deu-lr", type=float, default=1e-2, help="DEU shape (a, b, c, c1, c2) lr")
    ap.add_argument("--gain-lr", type=float, default=1e-2, help="DEU gain learning rate")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    task = TASKS[args.task]
    result = train_adapter(
        args.base,
        task,
        args.out,
        args.kind,
        rank=args.rank,
        alpha=args.alpha,
        targets=None if args.targets in (None, ["all-linear"]) else tuple(args.targets),
        all_linear=args.targets == ["all-linear"],
        layers=None if args.layers is None else tuple(args.layers),
        group_size=args.group_size,
        steps=args.steps,
        lr=args.lr,
        deu_lr=args.deu_lr,
        gain_lr=args.gain_lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    base_acc = accuracy(args.base, None, task)
    log.info(
        "%s %s: %d trainable parameters, %.0f s; held-out greedy accuracy %.1f%% with the "
        "adapter, %.1f%% base alone",
        result.kind,
        task.name,
        result.trainable_params,
        result.seconds,
        100 * result.accuracy,
        100 * base_acc,
    )


if __name__ == "__main__":
    main()
