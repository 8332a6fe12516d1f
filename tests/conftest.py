"""Shared test setup: run Triton kernels under the CPU interpreter when no GPU is present."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported (the kernels import it lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
