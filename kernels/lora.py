"""Batched multi-adapter LoRA: the public op and its torch paths.

The op, for every token t with k = token_slots[t] >= 0:

    y[t] += scales[k] * B[k] @ (A[k] @ x[t])

over stacked, zero-padded slot buffers A (S, R, d_in) and B (S, d_out, R). Tokens with
slot -1 are left bit-exactly untouched. ``build_slot_meta`` (kernels/slot_meta.py) does every
data-dependent step (sorting, segmenting, tiling, host copies) once per engine step;
``lora_apply`` is then called once per (layer, target), checks its arguments once and does no
sorting and no host<->device syncs on its GPU path.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from hotlora.kernels._common import TRITON_DTYPES, add_rows
from hotlora.kernels.checks import check_lora_args
from hotlora.kernels.slot_meta import SlotMeta, SlotRows


def lora_apply(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scales: Tensor, meta: SlotMeta) -> None:
    """In place: y[t] += scales[k] * B[k] @ (A[k] @ x[t]) for k = token_slots[t] >= 0.

    y (T, d_out), x (T, d_in), A (S, R, d_in), B (S, d_out, R), scales (S,) float32.
    CUDA fp16/bf16/fp32 runs the Triton SGMV kernels; everything else the torch path, in the
    weights' dtype: half weights with half x run in half (each product accumulates in fp32
    inside its kernel and rounds to half, as the Triton expand's tl.dot does), float32 weights
    with half x in float32, their delta rounded once into y.
    """
    check_lora_args(y, x, A, B, scales, meta)
    if meta.empty:
        return
    if x.is_cuda and x.dtype in TRITON_DTYPES:
        # Imported here so CPU-only use of this module never imports triton.
        from hotlora.kernels.triton_lora import sgmv_expand, sgmv_shrink

        sgmv_expand(y, sgmv_shrink(x, A, meta), B, scales, meta)
        return
    if A.dtype != x.dtype:  # float32 weights, half x (CPU): only x is converted per call
        # Every path adds its fp32 delta into the half y in one op that rounds once, as
        # converting y, adding and converting back would, without the two whole-y copies.
        # Rows without an adapter are never written.
        _torch_apply(y, x.float(), A, B, scales, meta)
        return
    _torch_apply(y, x, A, B, scales, meta)


def _torch_apply(
    y: Tensor, x: Tensor, A: Tensor, B: Tensor, scales: Tensor, meta: SlotMeta
) -> None:
    """Dispatch to the strategy build_slot_meta picked: y[t] += s[k] B[k] A[k] x[t]."""
    if meta.per_token:
        _apply_per_token(y, x, A, B, scales, meta)
        return
    plan = meta.cpu_plan_rowwise if _rows_contiguous(B) else meta.cpu_plan
    if plan == "gathered":
        _apply_gathered(y, x, A, B, scales, meta)
    elif plan == "runs":
        _apply_runs(y, x, A, B, scales, meta)
    else:
        _apply_segments(y, x, A, B, scales, meta)


def _apply_runs(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scales: Tensor, meta: SlotMeta) -> None:
    """Per run [a, b) of slot k: y[a:b] += s[k] * (x[a:b] A[k]^T) B[k]^T, in place on y's rows."""
    # One host read of all scales (a sync only on the CUDA fp64 fallback); each then rides in
    # addmm's alpha instead of costing a separate scaling op.
    sc = scales.tolist()
    for k, a, b in zip(meta.run_slots_host, meta.run_starts_host, meta.run_ends_host, strict=True):
        h = torch.mm(x[a:b], A[k].t())  # (n, R)
        if y.dtype == h.dtype:
            y[a:b].addmm_(h, B[k].t(), alpha=sc[k])
        else:  # a half y: add the fp32 delta, rounding once
            y[a:b].add_(torch.mm(h, B[k].t()), alpha=sc[k])


def _apply_segments(
    y: Tensor, x: Tensor, A: Tensor, B: Tensor, scales: Tensor, meta: SlotMeta
) -> None:
    """Group rows by slot: delta[seg] = s[k] * (x[seg] A[k]^T) B[k]^T, then y.index_add_(delta)."""
    n = meta.num_active
    xs = x.index_select(0, meta.sorted_tokens)  # (N, d_in)
    h = torch.empty((n, A.shape[1]), dtype=x.dtype, device=x.device)  # (N, R)
    delta = torch.empty((n, y.shape[1]), dtype=x.dtype, device=y.device)  # (N, d_out)
    sc = scales.tolist()
    st = meta.seg_starts_host
    for i, k in enumerate(meta.seg_slots_host):
        a, b = st[i], st[i + 1]
        torch.mm(xs[a:b], A[k].t(), out=h[a:b])
        # beta=0 ignores the (uninitialised) input, so this is delta = s * h @ B^T in one op.
        torch.addmm(delta[a:b], h[a:b], B[k].t(), beta=0, alpha=sc[k], out=delta[a:b])
    add_rows(y, meta.sorted_tokens, delta)


def _rows_contiguous(W: Tensor) -> bool:
    """W (S, m, n) is stored as (S, n, m): W[k, :, j] is one contiguous row of the storage."""
    return W.transpose(1, 2).is_contiguous()


def _apply_gathered(
    y: Tensor, x: Tensor, A: Tensor, B: Tensor, scales: Tensor, meta: SlotMeta
) -> None:
    """Per-token weights, batched: h[t] = s[k_t] * A[k_t] x[t]; y[t] += B[k_t] h[t].

    When a weight is stored transposed (A as (S, d_in, R), B as (S, R, d_out)), its product is
    one embedding_bag over the storage rows: a weighted row sum that reads each needed row once
    and copies nothing. Otherwise the token's slices are gathered (one copy) for a batched GEMV.
    """
    slots = meta.active_slots  # (N,)
    xs = x if meta.all_active else x.index_select(0, meta.active_tokens)  # (N, d_in)
    h = _slot_matvec(xs, A, slots, meta.gather_rows)  # (N, R)
    h.mul_(scales.index_select(0, slots).unsqueeze(1))
    delta = _slot_matvec(h, B, slots, meta.gather_rows)  # (N, d_out)
    if meta.all_active:
        y.add_(delta)  # a half y with fp32 weights takes the fp32 delta, rounding once
    else:
        add_rows(y, meta.active_tokens, delta)


def _apply_per_token(
    y: Tensor, x: Tensor, A: Tensor, B: Tensor, scales: Tensor, meta: SlotMeta
) -> None:
    """The gathered math over every token, its slot only on the device: rows without an
    adapter compute with slot 0 and scale 0, and keep their own bits through a select."""
    slots, active = meta.active_slots, meta.token_slots >= 0  # (T,), (T,)
    h = _slot_matvec(x, A, slots, {})  # (T, R)
    h.mul_((scales.index_select(0, slots) * active).unsqueeze(1))
    delta = _slot_matvec(h, B, slots, {})  # (T, d_out)
    y.copy_(torch.where(active.unsqueeze(1), y + delta, y))


def _slot_matvec(
    v: Tensor, W: Tensor, slots: Tensor, rows_by_width: Mapping[int, SlotRows]
) -> Tensor:
    """out[n] = W[slots[n]] @ v[n] for v (N, K), W (S, M, K): one call, no loop over tokens."""
    S, M, K = W.shape
    if _rows_contiguous(W):
        bags = rows_by_width.get(K) or SlotRows.of(slots, K)
        # torch.embedding_bag itself: F.embedding_bag's argument checks and 2-D reshaping cost
        # ~11 us per call here (17.9 vs 7.1 us at tiny shapes), twice in every gathered call.
        out, *_ = torch.embedding_bag(
            W.transpose(1, 2).reshape(S * K, M),  # (S * K, M), a view
            bags.rows,
            bags.offsets,
            False,  # scale_grad_by_freq
            0,  # mode: sum
            False,  # sparse
            v.reshape(-1),  # per-sample weights (N * K,)
            False,  # include_last_offset
        )
        return out  # (N, M)
    # Row-vector bmm ((N,1,K) @ (N,K,M)) maps to fast GEMV kernels; the column-vector form
    # ((N,M,K) @ (N,K,1)) measured ~2x slower on CPU.
    w_tok = W.index_select(0, slots)  # (N, M, K)
    return torch.bmm(v.unsqueeze(1), w_tok.transpose(1, 2)).squeeze(1)  # (N, M)
