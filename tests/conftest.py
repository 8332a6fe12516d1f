"""Shared test setup: run Triton kernels under the CPU interpreter when no GPU is present, and
refuse a run that put the checkout root on sys.path."""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

if not torch.cuda.is_available():
    # Must be set before triton is first imported (the kernels import it lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    # `python -m pytest` from the checkout puts its root first on sys.path, where kernels/
    # shadows Hugging Face's `kernels` (transformers imports it) and the folders import under
    # their bare names instead of as the installed `hotlora.*`.
    if any(Path(p or os.curdir).resolve() == REPO for p in sys.path):
        raise pytest.UsageError(
            "the checkout root is on sys.path: run `.venv/bin/pytest` (or `python -P -m pytest`),"
            " not `python -m pytest`"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
