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

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_decode_attention_args(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, lengths: Tensor, scale: float
) -> None:
    """Raise TypeError / ValueError unless the shapes, dtypes, devices and strides fit the op.

    Looks only at metadata (no device sync): the values of rows and lengths are not checked.
    """
    tensors = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("rows", rows))
    for name, t in (*tensors, ("lengths", lengths)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(
            "expected q (B, H, D) and k_cache, v_cache (N_rows, H_kv, S, D); got "
            f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    B, H, D = q.shape
    if rows.shape != (B,) or lengths.shape != (B,):
        raise ValueError(
            f"rows and lengths must be 1-D of length B={B}, got rows {tuple(rows.shape)}, "
            f"lengths {tuple(lengths.shape)}"
        )
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape"
        )
    H_kv, D_kv = k_cache.shape[1], k_cache.shape[3]
    if D_kv != D:
        raise ValueError(f"head dim differs: q has D={D}, the caches D={D_kv}")
    if H_kv == 0 or H % H_kv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of the kv heads H_kv={H_kv} >= 1")
    if not q.dtype.is_floating_point or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(
            f"q, k_cache, v_cache must share one floating dtype, got q {q.dtype}, "
            f"k_cache {k_cache.dtype}, v_cache {v_cache.dtype}"
        )
    if rows.dtype != torch.int64 or lengths.dtype != torch.int64:
        raise TypeError(
            f"rows and lengths must be int64 (no other integer dtype is accepted), got "
            f"rows {rows.dtype}, lengths {lengths.dtype}"
        )
    dev = q.device
    if any(t.device != dev for t in (k_cache, v_cache, rows, lengths)):
        raise ValueError(
            f"all tensors must be on one device: q {dev}, k_cache {k_cache.device}, "
            f"v_cache {v_cache.device}, rows {rows.device}, lengths {lengths.device}"
        )
    if B > 1 and (rows.stride(0) != 1 or lengths.stride(0) != 1):
        raise ValueError(
            f"rows and lengths must be contiguous, got strides {rows.stride()}, {lengths.stride()}"
        )
    if D > 1 and (q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1):
        raise ValueError(
            f"q, k_cache, v_cache need a contiguous last dim, got strides q {q.stride()}, "
            f"k_cache {k_cache.stride()}, v_cache {v_cache.stride()}"
        )


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
    if q.device.type == "cuda" and q.dtype in _TRITON_DTYPES:
        # Lazy: importing triton costs ~1 s and is not needed by the CPU path.
        from kernels.triton_attention import triton_decode_attention

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
