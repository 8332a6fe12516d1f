"""lm-evaluation-harness tasks built from the demo tasks (no download), and their definitions.

This directory is an lm_eval `--include_path`: each `<task>.yaml` here names its data through
`custom_dataset: !function hotlora_data.load` with `dataset_kwargs: {data_file: <jsonl>}`.
lm_eval imports `hotlora_data.py` from the yaml's own directory and `load` opens the jsonl next
to itself, so the tasks work from any working directory (a relative `data_files` under
`dataset_path: json` would be resolved against the working directory instead).

`EVAL_TASKS` is the one source of truth: `python -m hotlora.training.make_eval_tasks` writes the
yaml and jsonl files from it, and `python -m hotlora.training.evaluate` scores the same tasks
offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TASK_DIR = Path(__file__).resolve().parent

OutputType = Literal["multiple_choice", "generate_until"]


@dataclass(frozen=True)
class EvalTask:
    """One lm_eval task over a jsonl of demo items.

    Every item has `prompt` (`in: <word>\\nout:`), `completion` (the demo answer with its
    leading space, as the adapter writes it), `choices` (candidate answers without the leading
    space; lm_eval prepends `target_delimiter`) and `label` (the index of the right choice).
    """

    name: str
    output_type: OutputType
    data_file: str  # a jsonl file in TASK_DIR
    demo_task: str  # the demo task (adapters.demo_tasks.TASKS) whose answer is right
    target_delimiter: str = " "  # multiple_choice: continuation = target_delimiter + choice
    until: tuple[str, ...] = ("\n",)  # generate_until: stop strings (lm_eval adds EOS)
    max_gen_toks: int = 16  # generate_until: the longest answer is 8 tokens

    @property
    def metric(self) -> str:
        return "acc" if self.output_type == "multiple_choice" else "exact_match"

    @property
    def data_path(self) -> Path:
        return TASK_DIR / self.data_file

    @property
    def yaml_path(self) -> Path:
        return TASK_DIR / f"{self.name}.yaml"


REVERSE_DATA = "hotlora_reverse.jsonl"
EVAL_TASKS: dict[str, EvalTask] = {
    t.name: t
    for t in (
        EvalTask("hotlora_reverse_mc", "multiple_choice", REVERSE_DATA, "reverse"),
        EvalTask("hotlora_reverse_gen", "generate_until", REVERSE_DATA, "reverse"),
    )
}
