"""Data loading for the hotlora lm_eval tasks; standalone on purpose.

lm_eval imports this file by path (`custom_dataset: !function hotlora_data.load` in each yaml,
resolved next to the yaml), so it imports nothing from hotlora and finds its jsonl through
`__file__`, never through the working directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def read_items(data_file: str | Path) -> list[dict[str, Any]]:
    """The items of a jsonl file; a relative name is taken relative to this directory."""
    path = HERE / data_file  # an absolute data_file replaces HERE
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load(data_file: str = "hotlora_reverse.jsonl", **_: Any) -> Any:
    """lm_eval's `custom_dataset` hook: a DatasetDict with one `test` split.

    lm_eval calls it with the task's `metadata` and `dataset_kwargs` as keyword arguments;
    only `data_file` is used.
    """
    import datasets  # lm_eval's own dependency; hotlora does not need it otherwise

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_items(data_file))})
