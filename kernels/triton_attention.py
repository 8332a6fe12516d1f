"""Triton decode attention over a row-indexed KV cache. Private to kernels/.

One program per (sequence b, kv head kh) computes, for the G = H // H_kv query heads that share kh:

    out[b, h] = softmax(scale * q[b, h] . K[rows[b], kh, :len]^T) @ V[rows[b], kh, :len]

with len = clamp(lengths[b], 0, S), streaming K/V in BLOCK_S chunks with an online softmax
(running max m, running sum l, fp32 accumulator), so each K/V element is read once per program.

CUDA-graph safe: the grid is (B, H_kv), fixed by shapes; the chunk loop's bound is the length
loaded from device memory, so one captured launch serves any lengths. Products are broadcast
multiplies + tl.sum rather than tl.dot, so any G and D work (tl.dot needs block dims >= 16) and
the CPU interpreter runs it. The cache row is loaded as int64, so row * stride never wraps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hotlora.kernels._common import next_pow2
from hotlora.kernels.checks import check_block

# Cap on the (BLOCK_G, BLOCK_S, BLOCK_D) product tile, in fp32 elements: past it registers spill.
_TILE_BUDGET = 8192
_MIN_BLOCK_S = 4  # no tl.dot, so no 16-wide minimum: large G * D tiles get short chunks
_MAX_BLOCK_S = 64


@triton.jit
def _decode_attention_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    rows_ptr,
    lengths_ptr,
    scale,
    S,
    G,
    D,
    stride_qb,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_ks,
    stride_vn,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """out[b, kh*G + g] for g < G: online-softmax attention of those heads over one cache row."""
    b = tl.program_id(0)
    kh = tl.program_id(1)
    row = tl.load(rows_ptr + b)  # int64 scalar
    length = tl.load(lengths_ptr + b)  # int64 scalar
    # Clamped so that a bad length can never read past the row (0 -> no iteration -> zeros).
    length = tl.minimum(tl.maximum(length, 0), S)

    offs_g = tl.arange(0, BLOCK_G)  # (BLOCK_G,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask_g = offs_g < G
    mask_d = offs_d < D
    heads = kh * G + offs_g  # (BLOCK_G,)
    mask_gd = mask_g[:, None] & mask_d[None, :]
    q_ptrs = q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_gd, other=0.0).to(tl.float32)  # (BLOCK_G, BLOCK_D)
    q = q * scale

    k_base = k_ptr + row * stride_kn + kh * stride_kh
    v_base = v_ptr + row * stride_vn + kh * stride_vh
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_G,), dtype=tl.float32)  # noqa: E741  # the softmax denominator
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    offs_s0 = tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    for s0 in range(0, length, BLOCK_S):
        offs_s = s0 + offs_s0  # (BLOCK_S,)
        mask_s = offs_s < length
        mask_sd = mask_s[:, None] & mask_d[None, :]
        kt = tl.load(
            k_base + offs_s[:, None] * stride_ks + offs_d[None, :], mask=mask_sd, other=0.0
        ).to(tl.float32)  # (BLOCK_S, BLOCK_D)
        scores = tl.sum(q[:, None, :] * kt[None, :, :], axis=2)  # (BLOCK_G, BLOCK_S)
        scores = tl.where(mask_s[None, :], scores, float("-inf"))
        # s0 < length, so every chunk has a valid position and m_new is finite: the first
        # chunk's alpha = exp(-inf) = 0 and no exp ever sees inf - inf.
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # (BLOCK_G,)
        alpha = tl.exp(m - m_new)  # (BLOCK_G,)
        p = tl.exp(scores - m_new[:, None])  # (BLOCK_G, BLOCK_S), 0 where masked
        l = l * alpha + tl.sum(p, axis=1)  # noqa: E741
        vt = tl.load(
            v_base + offs_s[:, None] * stride_vs + offs_d[None, :], mask=mask_sd, other=0.0
        ).to(tl.float32)  # (BLOCK_S, BLOCK_D)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt[None, :, :], axis=1)
        m = m_new
    # A length-0 row never entered the loop: acc = 0, l = 0, and 0 / 1 gives the zeros we want.
    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # (BLOCK_G, BLOCK_D)
    out_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_gd)


def _default_block_s(block_g: int, block_d: int) -> int:
    """Largest power-of-two chunk in [4, 64] whose product tile fits the register budget."""
    fit = max(1, _TILE_BUDGET // (block_g * block_d))
    return max(_MIN_BLOCK_S, min(_MAX_BLOCK_S, next_pow2(fit + 1) // 2))  # largest 2^k <= fit


def triton_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    rows: Tensor,
    lengths: Tensor,
    scale: float,
    *,
    block_s: int | None = None,
) -> Tensor:
    """out[b, h] = softmax(scale * q[b, h] . K[rows[b], h // G, :len]^T) @ V[...], len clamped.

    Shapes and contract as kernels.attention.decode_attention; q (B, H, D), caches
    (N_rows, H_kv, S, D) in a dtype of TRITON_DTYPES. The arguments are not checked here:
    decode_attention checks them (kernels/checks.py) before it calls this, and a direct caller
    must call check_decode_attention_args itself. ``block_s`` (a power of two) overrides the
    chunk length (tests use a small one so the loop runs several times). Runs on CPU tensors
    under TRITON_INTERPRET=1.
    """
    if block_s is not None:
        check_block("block_s", block_s, 1)
    B, H, D = q.shape
    H_kv, S = k_cache.shape[1], k_cache.shape[2]
    G = H // H_kv
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)  # (B, H, D)
    if B == 0 or H == 0:
        return out
    block_g, block_d = next_pow2(G), next_pow2(D)
    bs = block_s if block_s is not None else _default_block_s(block_g, block_d)
    _decode_attention_kernel[(B, H_kv)](
        q,
        k_cache,
        v_cache,
        out,
        rows,
        lengths,
        float(scale),
        S,
        G,
        D,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        BLOCK_G=block_g,
        BLOCK_D=block_d,
        BLOCK_S=bs,
    )
    return out
