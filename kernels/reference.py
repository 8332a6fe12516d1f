"""Plain-torch specification of the batched multi-adapter LoRA op (obviously correct, not fast)."""

from __future__ import annotations

import torch
from torch import Tensor


def lora_reference(
    y: Tensor, x: Tensor, A: Tensor, B: Tensor, scales: Tensor, token_slots: Tensor
) -> Tensor:
    """out[t] = y[t] + s[k] * B[k] @ (A[k] @ x[t]) with k = token_slots[t]; k == -1 keeps y[t].

    Shapes: y (T, d_out), x (T, d_in), A (S, R, d_in), B (S, d_out, R), scales (S,),
    token_slots (T,) int. Returns a new tensor; the inputs are not modified. The product is
    formed in x's dtype (pass fp64 tensors to get a high-precision reference).
    """
    out = y.clone()  # (T, d_out)
    slots = token_slots.to(device=y.device, dtype=torch.long)  # (T,)
    # Loop over distinct slots, never index with -1: A[-1] would silently alias the last slot.
    for k in torch.unique(slots[slots >= 0]).tolist():
        rows = torch.nonzero(slots == k).squeeze(1)  # (n,)
        h = x[rows] @ A[k].T  # (n, R)
        delta = scales[k].to(x.dtype) * (h @ B[k].T)  # (n, d_out)
        out[rows] = out[rows] + delta.to(out.dtype)
    return out
