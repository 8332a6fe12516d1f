"""Rebuild every shipped demo asset: the base model, then one LoRA adapter per demo task.

    python -m training.build_demo            # base + all adapters (a few minutes on 2 cores)
    python -m training.build_demo --adapters-only

Prints each task's held-out greedy accuracy for the base alone and with its adapter.
"""

from __future__ import annotations

import argparse
import logging
import time

from adapters.demo_tasks import DEMO_ADAPTERS, DEMO_MODEL, DEMO_TASKS, TASKS
from training.pretrain_demo import pretrain
from training.train import accuracy, train_adapter

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--adapters-only", action="store_true")
    ap.add_argument("--base-steps", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tasks", nargs="*", default=list(DEMO_TASKS), choices=list(DEMO_TASKS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.adapters_only:
        copy = pretrain(DEMO_MODEL, args.base_steps)
        log.info("base model: copy accuracy %.1f%%", 100 * copy)
    rows = []
    for name in args.tasks:
        t0 = time.perf_counter()
        acc = train_adapter(
            DEMO_MODEL,
            TASKS[name],
            DEMO_ADAPTERS / name,
            rank=args.rank,
            alpha=2.0 * args.rank,
            steps=args.steps,
        ).accuracy
        rows.append((name, accuracy(DEMO_MODEL, None, TASKS[name]), acc, time.perf_counter() - t0))
    log.info("| task | base alone | with adapter | train time |")
    log.info("|---|---|---|---|")
    for name, base, acc, secs in rows:
        log.info("| %s | %.1f%% | %.1f%% | %.0f s |", name, 100 * base, 100 * acc, secs)


if __name__ == "__main__":
    main()
