"""Decode attention over a row-indexed KV cache: one new query token per sequence.

For every sequence b and query head h, with G = H // H_kv query heads per kv head (GQA/MQA):

    out[b, h] = softmax(scale * q[b, h] . K[rows[b], h // G, :lengths[b]]^T)
                @ V[rows[b], h // G, :lengths[b]]

over one layer's cache K, V (N_rows, H_kv, S, D). The scores, softmax and weighted sum run in
float32 whatever the input dtype (float64 stays float64), as transformers' eager attention does.

``decode_attention`` never syncs with the device and its launch depends only on shapes, never on
the values of ``rows`` / ``lengths``, so it can be captured in a CUDA graph once and replayed for
any lengths. The price: it cannot check those values. Callers keep 0 <= rows[b] < N_rows and
1 <= lengths[b] <= S; lengths outside [0, S] are clamped to it and a length of 0 gives zeros (the
Triton kernel and the torch path agree on both), but an out-of-range row is not caught.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hotlora.kernels._common import TRITON_DTYPES
from hotlora.kernels.checks import check_decode_attention_args


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, lengths: Tensor, scale: float
) -> Tensor:
    """out[b, h] = softmax(scale * q[b, h] . K[rows[b], h // G, :lengths[b]]^T) @ V[same].

    G = H // H_kv query heads share each kv head (MHA: G = 1, MQA: H_kv = 1).

    q (B, H, D); k_cache, v_cache (N_rows, H_kv, S, D), one layer's cache, any leading strides
    but a contiguous last dim; rows, lengths (B,) int64. Returns a new (B, H, D) tensor in q's
    dtype. CUDA fp16/bf16/fp32 runs the Triton kernel, everything else (CPU, fp64) a torch path;
    neither syncs with the device, so both can be captured in a CUDA graph. rows and lengths are
    not range-checked (that would sync): see the module docstring.
    """
    check_decode_attention_args(q, k_cache, v_cache, rows, lengths, scale)
    if q.device.type == "cuda" and q.dtype in TRITON_DTYPES:
        # Lazy: importing triton costs ~1 s and is not needed by the CPU path.
        from hotlora.kernels.triton_attention import triton_decode_attention

        return triton_decode_attention(q, k_cache, v_cache, rows, lengths, scale)
    return _torch_decode_attention(q, k_cache, v_cache, rows, lengths, float(scale))


def _torch_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, lengths: Tensor, scale: float
) -> Tensor:
    """Gather each sequence's cache row, then masked softmax attention, batched over (B, H_kv)."""
    B, H, D = q.shape
    H_kv, S = k_cache.shape[1], k_cache.shape[2]
    G = H // H_kv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = k_cache.index_select(0, rows).to(cdt)  # (B, H_kv, S, D)
    v = v_cache.index_select(0, rows).to(cdt)  # (B, H_kv, S, D)
    qg = q.reshape(B, H_kv, G, D).to(cdt)  # (B, H_kv, G, D): heads kh*G .. kh*G+G-1 share kh
    scores = torch.matmul(qg, k.transpose(2, 3)) * scale  # (B, H_kv, G, S)
    # Positions >= S do not exist, so lengths > S act as S, and lengths <= 0 mask everything.
    valid = (torch.arange(S, device=q.device) < lengths.unsqueeze(1))[:, None, None, :]  # (B,1,1,S)
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)  # (B, H_kv, G, S)
    # An all-masked row's softmax is NaN everywhere; zero it so a length-0 sequence gives zeros.
    probs = torch.where(valid, probs, 0.0)
    out = torch.matmul(probs, v)  # (B, H_kv, G, D)
    return out.reshape(B, H, D).to(q.dtype)
