"""Rebuild the shipped demo assets: a base model, then its adapters.

    python -m hotlora.training.build_demo                  # GPT-2 base + one LoRA per demo task
    python -m hotlora.training.build_demo --adapters-only
    python -m hotlora.training.build_demo --family llama   # Llama base + all-linear LoRA + a DEU

(The GPT-2 demo's upper-deu comes from `python -m hotlora.training.deu_study --ship`.) Prints each
task's held-out greedy accuracy for the base alone and with its adapter.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from hotlora.adapters.demo_tasks import (
    DEMO_ADAPTERS,
    DEMO_MODEL,
    DEMO_TASKS,
    LLAMA_DEMO_ADAPTERS,
    LLAMA_DEMO_MODEL,
    TASKS,
)
from hotlora.training.pretrain_demo import pretrain
from hotlora.training.train import accuracy, train_adapter

log = logging.getLogger(__name__)


def _plan(family: str, tasks: list[str], rank: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(adapter name, task, train_adapter kwargs) for each adapter of the family's demo."""
    if family == "gpt2":
        return [(t, t, {"rank": rank, "alpha": 2.0 * rank}) for t in tasks]
    return [
        ("reverse", "reverse", {"rank": rank, "alpha": 2.0 * rank, "all_linear": True}),
        ("upper-deu", "upper", {"kind": "deu", "deu_lr": 0.01, "gain_lr": 0.03, "steps": 1200}),
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--adapters-only", action="store_true")
    ap.add_argument("--base-steps", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tasks", nargs="*", default=list(DEMO_TASKS), choices=list(DEMO_TASKS),
                    help="GPT-2 demo tasks to train")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model: Path = DEMO_MODEL if args.family == "gpt2" else LLAMA_DEMO_MODEL
    root: Path = DEMO_ADAPTERS if args.family == "gpt2" else LLAMA_DEMO_ADAPTERS
    if not args.adapters_only:
        copy = pretrain(model, args.base_steps, family=args.family)
        log.info("base model: copy accuracy %.1f%%", 100 * copy)
    rows = []
    for name, task, kwargs in _plan(args.family, args.tasks, args.rank):
        t0 = time.perf_counter()
        acc = train_adapter(
            model, TASKS[task], root / name, **{"steps": args.steps, **kwargs}
        ).accuracy
        rows.append((name, accuracy(model, None, TASKS[task]), acc, time.perf_counter() - t0))
    log.info("| adapter | base alone | with adapter | train time |")
    log.info("|---|---|---|---|")
    for name, base, acc, secs in rows:
        log.info("| %s | %.1f%% | %.1f%% | %.0f s |", name, 100 * base, 100 * acc, secs)


if __name__ == "__main__":
    main()
