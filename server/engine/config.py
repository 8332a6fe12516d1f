"""Frozen configuration of the engine (each model family's config lives with its model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 matmul is ~100x slower than fp32 on CPUs without AMX; fp16 is the safe GPU default.
    return torch.float16 if device.type == "cuda" else torch.float32


# Every row's KV cache is preallocated for the whole context: a 128k-context Llama would need
# gigabytes per row, so the default context is capped (set max_seq_len to serve more).
DEFAULT_MAX_SEQ_LEN = 4096


@dataclass(frozen=True)
class EngineConfig:
    """Capacity of the engine, fixed at start-up (every buffer is preallocated from it)."""

    max_batch: int = 32  # KV-cache rows: requests decoded together
    max_seq_len: int | None = None  # None = the model's context, at most DEFAULT_MAX_SEQ_LEN
    max_adapters: int = 32  # device slots for LoRA adapters
    max_rank: int = 16
    device: str | None = None  # None = cuda if available else cpu
    dtype: str | None = None  # "float32" | "float16" | "bfloat16"; None = per device
    # False: outputs carry token ids only (no text, no stop strings). The server's engine
    # process runs so: its API process detokenizes, off the engine's critical path.
    detokenize: bool = True
    # CUDA only: replay decode steps from graphs captured per batch-size bucket (False: every
    # step launches its kernels one by one, as prefill always does).
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        for key in ("max_batch", "max_adapters", "max_rank"):
            if getattr(self, key) < 1:
                raise ValueError(f"EngineConfig.{key} must be >= 1, got {getattr(self, key)}")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(
                f"EngineConfig.dtype must be float32, float16 or bfloat16, got {self.dtype!r}"
            )

    def torch_device(self) -> torch.device:
        return torch.device(self.device) if self.device else default_device()

    def torch_dtype(self) -> torch.dtype:
        if self.dtype is None:
            return default_dtype(self.torch_device())
        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype
