"""Pretrain the tiny demo base model (a 4-layer GPT-2) from scratch on the copy task.

    python -m training.pretrain_demo --out adapters/demo/hotlora-demo

The base learns the `in: x\\nout: x` frame; the demo adapters then teach it other answers.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from adapters.demo_tasks import TASKS, build_tokenizer, eos_id
from server.engine.config import ModelConfig
from server.engine.loader import save_gpt2
from server.engine.model import GPT2
from training.train import accuracy, batches, fit

log = logging.getLogger(__name__)


def demo_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=257,
        n_positions=128,
        n_embd=128,
        n_layer=4,
        n_head=4,
        n_inner=512,
        bos_token_id=256,
        eos_token_id=256,
        name="hotlora-demo",
    )


def pretrain(out: Path, steps: int, lr: float = 2e-3, batch_size: int = 32, seed: int = 0) -> float:
    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = GPT2(demo_config())
    model.init_weights(seed=seed)
    data = batches(lambda s: tok.encode(s).ids, [TASKS["copy"]], batch_size, eos_id(tok), seed)
    fit(model, [{"params": list(model.parameters()), "lr": lr}], data, steps, desc="base")
    save_gpt2(model, out)
    tok.save(str(out / "tokenizer.json"))
    return accuracy(out, None, TASKS["copy"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    acc = pretrain(args.out, args.steps, args.lr)
    log.info("base copy accuracy on held-out words: %.1f%%", 100 * acc)


if __name__ == "__main__":
    main()
