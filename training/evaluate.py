"""Score the lm_eval tasks of `training/eval_tasks/` offline, with the engine (no server).

    python -m hotlora.training.evaluate --model adapters/demo/hotlora-demo \\
        --adapter reverse=adapters/demo/adapters/reverse --task hotlora_reverse_mc

It reproduces what lm-evaluation-harness (`--model local-completions`) computes through the
server, request for request:

- multiple_choice: each choice is a loglikelihood request (context = the prompt, continuation =
  target_delimiter + choice), tokenized as lm_eval's `_encode_pair` does (trailing spaces of the
  context move to the continuation; the whole string is encoded without special tokens and
  split after the context's own tokens). Its score is the sum of the log-softmax of the
  continuation tokens; acc = 1 when the right choice has the highest score (the first on a tie,
  as numpy's argmax).
- generate_until: the prompt's tokens (no special tokens), greedy, at most max_gen_toks tokens,
  stopping at EOS or at the task's `until` strings plus the EOS text (cut from the text);
  exact_match = the text equals the item's completion.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hotlora.server.engine import Engine, EngineConfig, SamplingParams
from hotlora.training.eval_tasks import EVAL_TASKS, EvalTask
from hotlora.training.eval_tasks.hotlora_data import read_items

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskScore:
    """A task's metric for one model (an adapter, or the base when adapter is None)."""

    task: str
    metric: str
    adapter: str | None
    correct: tuple[bool, ...]  # per item, in the data file's order
    predictions: tuple[str, ...]  # the chosen choice, or the generated text
    # multiple_choice: per item, (loglikelihood, is_greedy) of each choice, in the item's order
    choice_scores: tuple[tuple[tuple[float, bool], ...], ...] = ()

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0


def encode_pair(engine: Engine, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm_eval's TemplateLM._encode_pair (causal)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = engine.tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = engine.tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx) :]


def continuation_logprob(
    logits: torch.Tensor, ids: Sequence[int], ctxlen: int
) -> tuple[float, bool]:
    """(sum of log P(ids[i] | ids[:i]) for i >= ctxlen, whether each of those tokens is a most
    likely one); logits[j] predicts ids[j + 1]. lm_eval's (loglikelihood, is_greedy)."""
    logp = torch.log_softmax(logits[ctxlen - 1 : len(ids) - 1].float(), dim=-1)
    target = torch.tensor(ids[ctxlen:], device=logp.device)
    chosen = logp.gather(1, target[:, None])[:, 0]
    greedy = bool((chosen == logp.max(dim=-1).values).all())
    # lm_eval adds the per-token floats of the JSON response one by one
    return sum(chosen.tolist()), greedy


def loglikelihoods(
    engine: Engine,
    adapter: str | None,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 1,
) -> list[tuple[float, bool]]:
    """(loglikelihood, is_greedy) of each (context, continuation); batch_size prompts per
    forward pass (1 runs every sequence alone, as lm_eval's default batch_size=1 has the
    server do)."""
    encoded = [encode_pair(engine, ctx, cont) for ctx, cont in requests]
    for ctx, cont in encoded:
        if not ctx or not cont:
            raise ValueError("every request needs a non-empty context and continuation")
    out: list[tuple[float, bool]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        seqs = [ctx + cont for ctx, cont in chunk]
        logits = engine.prompt_logits(seqs, [adapter] * len(seqs))
        out += [
            continuation_logprob(lg, seq, len(ctx))
            for lg, seq, (ctx, _) in zip(logits, seqs, chunk, strict=True)
        ]
    return out


def score_multiple_choice(
    engine: Engine,
    adapter: str | None,
    task: EvalTask,
    items: Sequence[dict[str, Any]],
    batch_size: int = 1,
) -> TaskScore:
    requests = [
        (it["prompt"], task.target_delimiter + choice) for it in items for choice in it["choices"]
    ]
    lls = iter(loglikelihoods(engine, adapter, requests, batch_size))
    correct, preds, details = [], [], []
    for it in items:
        scored = tuple(next(lls) for _ in it["choices"])
        best = max(range(len(scored)), key=lambda i: scored[i][0])  # the first maximum, as argmax
        correct.append(best == it["label"])
        preds.append(it["choices"][best])
        details.append(scored)
    return TaskScore(task.name, task.metric, adapter, tuple(correct), tuple(preds), tuple(details))


def eos_strings(engine: Engine) -> list[str]:
    """The EOS tokens' text, which lm_eval appends to the stop strings."""
    return [engine.tokenizer.decode([i], skip_special_tokens=False) for i in engine.eos_token_ids]


def score_generation(
    engine: Engine, adapter: str | None, task: EvalTask, items: Sequence[dict[str, Any]]
) -> TaskScore:
    stop = list(task.until) + [s for s in eos_strings(engine) if s not in task.until]
    params = SamplingParams(max_tokens=task.max_gen_toks, temperature=0.0, stop=tuple(stop))
    prompts = [engine.tokenizer.encode(it["prompt"], add_special_tokens=False) for it in items]
    outs = engine.generate(prompts, [adapter] * len(prompts), params)
    texts = [o.text for o in outs]
    correct = tuple(t == it["completion"] for t, it in zip(texts, items, strict=True))
    return TaskScore(task.name, task.metric, adapter, correct, tuple(texts))


def evaluate(
    engine: Engine,
    adapter: str | None,
    task: str | EvalTask,
    limit: int | None = None,
    batch_size: int = 1,
) -> TaskScore:
    """Score one task (by name or definition) for one adapter (None = the base model)."""
    spec = EVAL_TASKS[task] if isinstance(task, str) else task
    items = read_items(spec.data_path)[:limit]
    if spec.output_type == "multiple_choice":
        score = score_multiple_choice(engine, adapter, spec, items, batch_size)
    else:
        score = score_generation(engine, adapter, spec, items)
    log.info(
        "%s %s: %s = %.4f (%d/%d)",
        spec.name,
        adapter or "base",
        spec.metric,
        score.accuracy,
        sum(score.correct),
        len(score.correct),
    )
    return score


def _named_dir(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, Path(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="the base model directory")
    ap.add_argument(
        "--adapter",
        type=_named_dir,
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an adapter to score (repeatable)",
    )
    ap.add_argument(
        "--base", action="store_true", help="score the base model too (always without --adapter)"
    )
    ap.add_argument(
        "--task",
        action="append",
        choices=sorted(EVAL_TASKS),
        help="a task (repeatable; default: all)",
    )
    ap.add_argument("--limit", type=int, default=None, help="score only the first N items")
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass")
    ap.add_argument("--max-rank", type=int, default=64, help="the largest adapter rank (as serve)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    config = EngineConfig(
        max_batch=max(args.batch_size, 32),
        max_adapters=max(1, len(args.adapter)),
        max_rank=args.max_rank,
    )
    engine = Engine.from_pretrained(args.model, config, device=args.device, dtype=args.dtype)
    for name, path in args.adapter:
        engine.add_adapter(name, path)
    models: list[str | None] = [name for name, _ in args.adapter]
    if args.base or not models:
        models.insert(0, None)
    width = max(len(adapter or args.model.name) for adapter in models)
    print(f"{'task':<24} {'model':<{width}} {'metric':<12} {'value':>7}  n")
    for task in args.task or sorted(EVAL_TASKS):
        for adapter in models:
            s = evaluate(engine, adapter, task, args.limit, args.batch_size)
            label = adapter or args.model.name
            print(
                f"{s.task:<24} {label:<{width}} {s.metric:<12} {s.accuracy:>7.4f}  "
                f"{sum(s.correct)}/{len(s.correct)}"
            )


if __name__ == "__main__":
    main()
