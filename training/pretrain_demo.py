"""Pretrain a tiny demo base model from scratch on the copy task: a 4-layer GPT-2, or a 4-layer
Llama-family model (GQA, untied head).

    python -m hotlora.training.pretrain_demo --out adapters/demo/hotlora-demo
    python -m hotlora.training.pretrain_demo --family llama --out adapters/demo/hotlora-llama-demo

The base learns the `in: x\\nout: x` frame; the demo adapters then teach it other answers.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from hotlora.adapters.demo_tasks import DEMO_CHAT_TEMPLATE, EOS, TASKS, build_tokenizer, eos_id
from hotlora.server.engine.loader import save_model
from hotlora.server.engine.models import GPT2, GPT2Config, Llama, LlamaConfig
from hotlora.training.train import accuracy, batches, fit

log = logging.getLogger(__name__)

Family = Literal["gpt2", "llama"]


def demo_model(family: Family) -> GPT2 | Llama:
    if family == "gpt2":
        return GPT2(GPT2Config(
            vocab_size=257, n_positions=128, n_embd=128, n_layer=4, n_head=4, n_inner=512,
            bos_token_id=256, eos_token_id=256, name="hotlora-demo",
        ))
    return Llama(LlamaConfig(
        model_type="llama", vocab_size=257, hidden_size=128, intermediate_size=384, n_layer=4,
        n_head=4, n_kv_head=2, head_dim=32, max_position_embeddings=128,
        bos_token_id=256, eos_token_id=256, name="hotlora-llama-demo",
    ))


def pretrain(
    out: Path, steps: int, lr: float = 2e-3, batch_size: int = 32, seed: int = 0,
    family: Family = "gpt2",
) -> float:
    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = demo_model(family)
    model.init_weights(seed=seed)
    data = batches(lambda s: tok.encode(s).ids, [TASKS["copy"]], batch_size, eos_id(tok), seed)
    params: list[nn.Parameter] = list(model.parameters())
    fit(model, [{"params": params, "lr": lr}], data, steps, desc=f"base:{family}")
    save_model(model, out)
    tok.save(str(out / "tokenizer.json"))
    # No BOS: prompts encode exactly as the GPT-2 demo's do (AutoTokenizer agrees).
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS,
                  "add_bos_token": False, "model_max_length": model.cfg.max_positions}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    # The chat template: /v1/chat/completions turns the last user message into the demo prompt.
    (out / "chat_template.jinja").write_text(DEMO_CHAT_TEMPLATE, encoding="utf-8")
    return accuracy(out, None, TASKS["copy"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    acc = pretrain(args.out, args.steps, args.lr, family=args.family)
    log.info("base copy accuracy on held-out words: %.1f%%", 100 * acc)


if __name__ == "__main__":
    main()
