"""Triton SGMV (Punica-style) kernels for batched multi-adapter LoRA. Private to kernels/.

Tokens are pre-sorted by slot (``SlotMeta.sorted_tokens``) and cut into BLOCK_M-high tiles that
never straddle two slots (``SlotMeta.tile_*``), so each program multiplies one token tile by one
adapter's weights:

    shrink: buf[p]            = x[tok[p]] @ A[k]^T                (fp32, p = sorted position)
    expand: y[tok[p]]        += scales[k] * buf[p] @ B[k]^T       (read-add-write)

Each (token, output column) pair is owned by exactly one expand program, so the update needs no
atomics and no split-K. Row offsets are int64 (token ids and slot ids are loaded as int64), so
T * d and S * R * d beyond 2**31 elements are safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hotlora.kernels._common import MIN_DOT_BLOCK, next_pow2
from hotlora.kernels.checks import check_block
from hotlora.kernels.slot_meta import SlotMeta

_MAX_BLOCK_R = 64
_DEFAULT_BLOCK_K = 64
_DEFAULT_BLOCK_N = 64


@triton.jit
def _sgmv_shrink_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations
    x_ptr,
    a_ptr,
    out_ptr,
    sorted_tokens_ptr,
    tile_slots_ptr,
    tile_starts_ptr,
    tile_ends_ptr,
    d_in,
    rank,
    stride_xt,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    stride_on,
    stride_or,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):
    """out[p, r] = sum_k x[tok[p], k] * A[slot, r, k] for the p of one tile, r of one rank block."""
    tile = tl.program_id(0)
    pid_r = tl.program_id(1)
    slot = tl.load(tile_slots_ptr + tile)  # int64 scalar
    row_start = tl.load(tile_starts_ptr + tile)
    row_end = tl.load(tile_ends_ptr + tile)

    # An empty tile (a per-token meta's token without an adapter) does no work.
    if row_end > row_start:
        offs_m = row_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) int64 sorted positions
        mask_m = offs_m < row_end
        tok = tl.load(sorted_tokens_ptr + offs_m, mask=mask_m, other=0)  # (BLOCK_M,) int64
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        mask_r = offs_r < rank
        offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)

        x_rows = x_ptr + tok[:, None] * stride_xt  # (BLOCK_M, 1) gathered rows
        a_cols = a_ptr + slot * stride_as + offs_r[None, :] * stride_ar  # (1, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            k = k0 + offs_k
            mask_k = k < d_in
            xt = tl.load(
                x_rows + k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0
            )  # (BLOCK_M, BLOCK_K)
            at = tl.load(
                a_cols + k[:, None] * stride_ak, mask=mask_k[:, None] & mask_r[None, :], other=0.0
            )  # (BLOCK_K, BLOCK_R)
            if IEEE_FP32:
                # fp32 callers expect fp32 accuracy; the default tf32 would keep only 10 bits.
                acc += tl.dot(xt, at, input_precision="ieee")
            else:
                acc += tl.dot(xt, at)
        out = out_ptr + offs_m[:, None] * stride_on + offs_r[None, :] * stride_or
        tl.store(out, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _sgmv_expand_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations
    y_ptr,
    h_ptr,
    b_ptr,
    scales_ptr,
    sorted_tokens_ptr,
    tile_slots_ptr,
    tile_starts_ptr,
    tile_ends_ptr,
    d_out,
    rank,
    stride_yt,
    stride_yn,
    stride_hn,
    stride_hr,
    stride_bs,
    stride_bn,
    stride_br,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):
    """y[tok[p], n] += scales[slot] * sum_r h[p, r] * B[slot, n, r] for one tile, one n block."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(tile_slots_ptr + tile)  # int64 scalar
    row_start = tl.load(tile_starts_ptr + tile)
    row_end = tl.load(tile_ends_ptr + tile)

    # An empty tile (a per-token meta's token without an adapter) does no work.
    if row_end > row_start:
        offs_m = row_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) int64 sorted positions
        mask_m = offs_m < row_end
        tok = tl.load(sorted_tokens_ptr + offs_m, mask=mask_m, other=0)  # (BLOCK_M,) int64
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        mask_n = offs_n < d_out
        offs_r = tl.arange(0, BLOCK_R)  # (BLOCK_R,)

        h_rows = h_ptr + offs_m[:, None] * stride_hn  # (BLOCK_M, 1)
        b_cols = b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn  # (1, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + offs_r
            mask_r = r < rank
            ht = tl.load(
                h_rows + r[None, :] * stride_hr, mask=mask_m[:, None] & mask_r[None, :], other=0.0
            )  # (BLOCK_M, BLOCK_R) fp32
            bt = tl.load(
                b_cols + r[:, None] * stride_br, mask=mask_r[:, None] & mask_n[None, :], other=0.0
            )  # (BLOCK_R, BLOCK_N)
            if IEEE_FP32:
                acc += tl.dot(ht, bt, input_precision="ieee")
            else:
                # Half inputs: run the tensor-core dot in B's dtype, accumulate in fp32.
                acc += tl.dot(ht.to(bt.dtype), bt)
        scale = tl.load(scales_ptr + slot)  # fp32 scalar

        y_ptrs = y_ptr + tok[:, None] * stride_yt + offs_n[None, :] * stride_yn
        mask = mask_m[:, None] & mask_n[None, :]
        y_old = tl.load(y_ptrs, mask=mask, other=0.0)  # (BLOCK_M, BLOCK_N)
        y_new = y_old.to(tl.float32) + acc * scale
        tl.store(y_ptrs, y_new.to(y_ptr.dtype.element_ty), mask=mask)


def _block_r(rank: int) -> int:
    """The rank block: R rounded up to a power of two, clamped to [MIN_DOT_BLOCK, 64]."""
    return min(_MAX_BLOCK_R, max(MIN_DOT_BLOCK, next_pow2(rank)))


def sgmv_shrink(x: Tensor, A: Tensor, meta: SlotMeta, *, block_k: int | None = None) -> Tensor:
    """buf[p] = x[sorted_tokens[p]] @ A[k_p]^T, returned as an fp32 (N, R) buffer in sorted order.

    Sorted order (rather than (T, R) by token) keeps the expand kernel's loads contiguous and,
    with build_slot_meta's metas, allocates nothing for tokens without an adapter (a per-token
    meta's N is T: their rows are never written nor read). Unchecked, as sgmv_expand.
    """
    n, d_in, rank = meta.num_active, x.shape[1], A.shape[1]
    buf = torch.empty((n, rank), dtype=torch.float32, device=x.device)  # (N, R)
    if meta.num_tiles == 0 or rank == 0:
        return buf
    block_r = _block_r(rank)
    bk = _DEFAULT_BLOCK_K
    if block_k is not None:
        bk = check_block("block_k", block_k, MIN_DOT_BLOCK)
    grid = (meta.num_tiles, triton.cdiv(rank, block_r))
    _sgmv_shrink_kernel[grid](
        x,
        A,
        buf,
        meta.sorted_tokens,
        meta.tile_slots,
        meta.tile_starts,
        meta.tile_ends,
        d_in,
        rank,
        x.stride(0),
        x.stride(1),
        A.stride(0),
        A.stride(1),
        A.stride(2),
        buf.stride(0),
        buf.stride(1),
        BLOCK_M=meta.block_m,
        BLOCK_R=block_r,
        BLOCK_K=bk,
        IEEE_FP32=x.dtype == torch.float32,
    )
    return buf


def sgmv_expand(
    y: Tensor,
    buf: Tensor,
    B: Tensor,
    scales: Tensor,
    meta: SlotMeta,
    *,
    block_n: int | None = None,
) -> None:
    """In place: y[sorted_tokens[p]] += scales[k_p] * buf[p] @ B[k_p]^T (no atomics).

    buf is sgmv_shrink's (N, R) fp32 output for the same meta. Neither launcher checks its
    arguments: lora_apply checks them once per call (kernels/checks.py check_lora_args) before
    it launches both, and a direct caller must do the same.
    """
    rank = B.shape[2]
    d_out = y.shape[1]
    if meta.num_tiles == 0 or rank == 0 or d_out == 0:
        return
    block_r = _block_r(rank)
    bn = _DEFAULT_BLOCK_N
    if block_n is not None:
        bn = check_block("block_n", block_n, MIN_DOT_BLOCK)
    grid = (meta.num_tiles, triton.cdiv(d_out, bn))
    _sgmv_expand_kernel[grid](
        y,
        buf,
        B,
        scales,
        meta.sorted_tokens,
        meta.tile_slots,
        meta.tile_starts,
        meta.tile_ends,
        d_out,
        rank,
        y.stride(0),
        y.stride(1),
        buf.stride(0),
        buf.stride(1),
        B.stride(0),
        B.stride(1),
        B.stride(2),
        BLOCK_M=meta.block_m,
        BLOCK_N=bn,
        BLOCK_R=block_r,
        IEEE_FP32=y.dtype == torch.float32,
    )
