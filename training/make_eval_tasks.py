"""Write the lm_eval tasks of `training/eval_tasks/` (yaml + jsonl) deterministically.

    python -m hotlora.training.make_eval_tasks            # rewrite training/eval_tasks/
    python -m hotlora.training.make_eval_tasks --check    # exit 1 if the shipped files differ
    python -m hotlora.training.make_eval_tasks --out DIR  # a self-contained copy (an include path)

Items come from the demo tasks (`adapters.demo_tasks`) with a seeded generator that no training
run uses: a word, its prompt `in: <word>\\nout:`, the right answer, and as distractors what the
other demo adapters (and the copying base) answer for that word.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
from pathlib import Path
from typing import Any

from hotlora.adapters.demo_tasks import TASKS, prompt_for
from hotlora.training.eval_tasks import EVAL_TASKS, TASK_DIR, EvalTask

log = logging.getLogger(__name__)

N_ITEMS = 40
SEED = 2024  # training draws with seed 0 (and friends), held-out checks with 1234
# The answers offered as choices: the right task's first, then every other transformation
# the demo adapters (and the copying base) produce for a word.
CHOICE_TASKS = ("reverse", "upper", "sort", "pirate", "copy")
DATA_MODULE = "hotlora_data.py"
HEADER = (
    "# Written by `python -m hotlora.training.make_eval_tasks`; edit EVAL_TASKS in "
    "training/eval_tasks/__init__.py instead.\n"
)


def make_items(demo_task: str, n: int = N_ITEMS, seed: int = SEED) -> list[dict[str, Any]]:
    """n distinct words of `demo_task` whose candidate answers are all different."""
    task = TASKS[demo_task]
    names = (demo_task, *(t for t in CHOICE_TASKS if t != demo_task))
    rng = random.Random(seed)
    seen: set[str] = set()
    items: list[dict[str, Any]] = []
    while len(items) < n:
        word = task.draw(rng)
        answers = [TASKS[t].answer(word) for t in names]
        if word in seen or len(set(answers)) < len(answers):
            continue  # a palindrome, sorted letters...: the choices would not be distinct
        seen.add(word)
        order = list(range(len(names)))
        rng.shuffle(order)  # the right answer's position varies: a tie cannot favour it
        items.append(
            {
                "word": word,
                "prompt": prompt_for(word),
                "answer": answers[0],
                "completion": " " + answers[0],
                "choices": [answers[i] for i in order],
                "choice_tasks": [names[i] for i in order],
                "label": order.index(0),
            }
        )
    return items


def _q(s: str) -> str:
    """A YAML double-quoted scalar (JSON's escapes are YAML's)."""
    return json.dumps(s)


def task_yaml(task: EvalTask) -> str:
    lines = [
        f"task: {task.name}",
        "custom_dataset: !function hotlora_data.load",
        "dataset_kwargs:",
        f"  data_file: {task.data_file}",
        f"output_type: {task.output_type}",
        "test_split: test",
        "doc_to_text: prompt",
    ]
    if task.output_type == "multiple_choice":
        lines += [
            "doc_to_choice: choices",
            "doc_to_target: label",
            f"target_delimiter: {_q(task.target_delimiter)}",
        ]
    else:
        lines += [
            "doc_to_target: completion",
            "generation_kwargs:",
            f"  until: [{', '.join(_q(s) for s in task.until)}]",
            f"  max_gen_toks: {task.max_gen_toks}",
            "  do_sample: false",
            "  temperature: 0.0",
        ]
    lines += [
        "metric_list:",
        f"  - metric: {task.metric}",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
    ]
    return HEADER + "\n".join(lines) + "\n"


def render(n: int = N_ITEMS, seed: int = SEED) -> dict[str, str]:
    """File name -> text of every generated file (yaml per task, jsonl per data file)."""
    files: dict[str, str] = {}
    data_tasks: dict[str, str] = {}
    for task in EVAL_TASKS.values():
        files[task.yaml_path.name] = task_yaml(task)
        if data_tasks.setdefault(task.data_file, task.demo_task) != task.demo_task:
            raise ValueError(f"{task.data_file} is shared by tasks of different demo tasks")
    for data_file, demo_task in data_tasks.items():
        items = make_items(demo_task, n, seed)
        files[data_file] = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
    return files


def write(out: Path, n: int = N_ITEMS, seed: int = SEED) -> list[Path]:
    """Write the task files to `out` (with the data module when `out` is another directory)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render(n, seed).items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    if out.resolve() != TASK_DIR:
        shutil.copyfile(TASK_DIR / DATA_MODULE, out / DATA_MODULE)
        written.append(out / DATA_MODULE)
    return written


def stale(n: int = N_ITEMS, seed: int = SEED) -> list[str]:
    """The shipped files that differ from what `render` writes."""
    return [
        name
        for name, text in render(n, seed).items()
        if not (TASK_DIR / name).is_file() or (TASK_DIR / name).read_text(encoding="utf-8") != text
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=TASK_DIR, help="directory to write to")
    ap.add_argument("--n", type=int, default=N_ITEMS, help="items per data file")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--check", action="store_true", help="only compare with the shipped files")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.check:
        bad = stale(args.n, args.seed)
        if bad:
            log.error("stale: %s (run python -m hotlora.training.make_eval_tasks)", ", ".join(bad))
            sys.exit(1)
        log.info("training/eval_tasks is up to date")
        return
    for path in write(args.out, args.n, args.seed):
        log.info("wrote %s", path)


if __name__ == "__main__":
    main()
