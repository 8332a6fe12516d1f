"""Triton kernel for the batched per-slot DEU activation delta. Private to kernels/.

    y[t, f] += g[k, f] * D[k, f](h[t, f])        for every token t with k = token_slots[t] >= 0

D is kernels/deu.py's unit, evaluated from the slot's planes (PLANES, stored as a (N_PLANES, S, F)
float32 bank) with `deu_eval`'s formula in fp32, except that cosh and sinh come from exp and S from
its series for small |r t| (deu_eval uses expm1 there): the two agree to rounding. The op is
elementwise, so there is no sorting or tiling by slot: each program owns a (BLOCK_T tokens, BLOCK_F
features) tile and every token gathers its own slot's planes. Rows with slot -1 are never written
(bit-exact), a tile whose tokens all have slot -1 loads nothing else, and row and slot offsets are
int64.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from hotlora.kernels.checks import check_block
from hotlora.kernels.deu_params import CLIP, OUT_MAX, S_SERIES_RT

# 8 x 128 = 1024 elements: 8 per thread with 4 warps keeps ~20 live fp32 values per element
# (9 planes and the temporaries) in registers; wide feature blocks keep loads coalesced.
_DEFAULT_BLOCK_T = 8
_DEFAULT_BLOCK_F = 128


@triton.jit
def _deu_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations
    y_ptr,
    h_ptr,
    bank_ptr,
    slots_ptr,
    n_tokens,
    n_feat,
    n_slots,
    stride_yt,
    stride_ht,
    stride_bp,
    stride_bs,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
    CLIP_T: tl.constexpr,
    OUT_CLAMP: tl.constexpr,
    SERIES_RT: tl.constexpr,
):
    """y[t, f] += gain * D(h[t, f]) with the planes of slot k_t, for one (token, feature) tile."""
    pid_t = tl.program_id(0).to(tl.int64)
    pid_f = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) int64
    slot = tl.load(slots_ptr + offs_t, mask=offs_t < n_tokens, other=-1).to(tl.int64)
    # Slots past S are skipped, never read out of bounds: nothing can check a CUDA tensor's
    # range without a sync (deu_apply checks SlotMeta.max_slot on the host instead).
    active = (slot >= 0) & (slot < n_slots)  # (BLOCK_T,)
    if tl.max(active.to(tl.int32), axis=0) > 0:
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)  # (BLOCK_F,) int64
        mask = active[:, None] & (offs_f < n_feat)[None, :]  # (BLOCK_T, BLOCK_F)
        plane0 = bank_ptr + slot[:, None] * stride_bs + offs_f[None, :]  # (BLOCK_T, BLOCK_F)
        # Plane order: PLANES in kernels/deu.py.
        m = tl.load(plane0, mask=mask, other=0.0)
        r = tl.load(plane0 + stride_bp, mask=mask, other=0.0)
        inv_r = tl.load(plane0 + 2 * stride_bp, mask=mask, other=0.0)
        hyp = tl.load(plane0 + 3 * stride_bp, mask=mask, other=0.0)
        c1 = tl.load(plane0 + 4 * stride_bp, mask=mask, other=0.0)
        c2 = tl.load(plane0 + 5 * stride_bp, mask=mask, other=0.0)
        inv_c = tl.load(plane0 + 6 * stride_bp, mask=mask, other=0.0)
        m_inv_c = tl.load(plane0 + 7 * stride_bp, mask=mask, other=0.0)
        gain = tl.load(plane0 + 8 * stride_bp, mask=mask, other=0.0)

        h_ptrs = h_ptr + offs_t[:, None] * stride_ht + offs_f[None, :]
        t = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        t = tl.clamp(t, -CLIP_T, CLIP_T)
        rt = r * t  # |rt| <= 32 for banks built by deu_planes
        cos = tl.cos(rt)
        sin = tl.sin(rt)
        # Triton has no cosh / sinh; e^(+-rt) stays below ~1e14. The exp difference cancels for
        # small |rt|, where the series below replaces S (it has no cancellation at all).
        e_pos = tl.exp(rt)
        e_neg = tl.exp(-rt)
        cosh = 0.5 * (e_pos + e_neg)
        sinh = 0.5 * (e_pos - e_neg)
        # hyp is exactly 0 or 1: the blend selects one regime (as in deu_eval).
        C = cos + hyp * (cosh - cos)
        S = (sin + hyp * (sinh - sin)) * inv_r
        z = (2.0 * hyp - 1.0) * (rt * rt)  # q t^2
        series = t * (
            1.0
            + z / 6.0 * (1.0 + z / 20.0 * (1.0 + z / 42.0 * (1.0 + z / 72.0 * (1.0 + z / 110.0))))
        )
        S = tl.where(tl.abs(rt) < SERIES_RT, series, S)
        em = tl.exp(m * t)
        step = (t > 0.0).to(tl.float32)
        k_c = step * inv_c
        d = k_c + em * (C * (c1 - k_c) + S * (c2 + step * m_inv_c))
        d = tl.clamp(d, -OUT_CLAMP, OUT_CLAMP)

        y_ptrs = y_ptr + offs_t[:, None] * stride_yt + offs_f[None, :]
        y_old = tl.load(y_ptrs, mask=mask, other=0.0)
        y_new = y_old.to(tl.float32) + gain * d
        tl.store(y_ptrs, y_new.to(y_ptr.dtype.element_ty), mask=mask)


def deu_add(
    y: Tensor,
    h: Tensor,
    bank: Tensor,
    token_slots: Tensor,
    *,
    block_t: int | None = None,
    block_f: int | None = None,
) -> None:
    """In place: y[t] += g_k * D_k(h[t]) for k = token_slots[t] >= 0; other rows never written.

    y, h (T, F) fp16 / bf16 / fp32 with a contiguous last dim (math in fp32), bank
    (N_PLANES, S, F) float32 contiguous (see kernels.deu.deu_planes), token_slots (T,) int32 /
    int64 contiguous with -1 = no adapter. The arguments are not checked here: deu_apply checks
    them once per call (kernels/checks.py check_deu_args, and the SlotMeta builders check the
    slots), and a direct caller must do the same. Slots >= S are skipped rather than read.
    """
    bt = _DEFAULT_BLOCK_T if block_t is None else check_block("block_t", block_t, 1)
    bf = _DEFAULT_BLOCK_F if block_f is None else check_block("block_f", block_f, 1)
    n_tokens, n_feat = y.shape
    if n_tokens == 0 or n_feat == 0 or bank.shape[1] == 0:
        return
    grid = (triton.cdiv(n_tokens, bt), triton.cdiv(n_feat, bf))
    _deu_kernel[grid](
        y,
        h,
        bank,
        token_slots,
        n_tokens,
        n_feat,
        bank.shape[1],
        y.stride(0),
        h.stride(0),
        bank.stride(0),
        bank.stride(1),
        BLOCK_T=bt,
        BLOCK_F=bf,
        CLIP_T=CLIP,
        OUT_CLAMP=OUT_MAX,
        SERIES_RT=S_SERIES_RT,
    )
