"""What every kernel module shares: the Triton dtypes, the tile minimum, the power-of-two helper
and the half-y row update. A leaf module (it imports torch only), so the dispatchers, the Triton
launchers and the slot metadata can all import it without importing each other."""

from __future__ import annotations

import torch
from torch import Tensor

# The dtypes the Triton kernels take; every other dtype (fp64) runs the torch paths.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Activations that the CPU torch paths may pair with float32 weights (computing in fp32).
HALF_DTYPES = (torch.float16, torch.bfloat16)

# tl.dot on a real GPU needs every block dim >= 16; the kernels' masks cover the padding.
MIN_DOT_BLOCK = 16


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1): 2^ceil(log2(n))."""
    return 1 << max(0, n - 1).bit_length()


def add_rows(y: Tensor, tokens: Tensor, delta: Tensor) -> None:
    """y[tokens] += delta for distinct tokens; a half y adds an fp32 delta, rounding once."""
    if delta.dtype == y.dtype:
        y.index_add_(0, tokens, delta)
        return
    rows = y.index_select(0, tokens)  # (N, d_out)
    rows.add_(delta)
    y.index_copy_(0, tokens, rows)
