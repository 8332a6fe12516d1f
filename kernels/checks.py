"""Argument checks of the public kernel ops, each run once per call by its dispatcher.

``lora_apply``, ``deu_apply`` and ``decode_attention`` call their check first, then either the
torch path or a Triton launcher; the launchers (kernels/triton_*.py) trust their caller and do
not check again, so the eager CUDA path pays for one check per layer, not two. Every check reads
metadata only (shapes, dtypes, devices, strides, SlotMeta's host bounds): none syncs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hotlora.kernels._common import HALF_DTYPES, next_pow2
from hotlora.kernels.deu_params import N_PLANES
from hotlora.kernels.slot_meta import SlotMeta


def check_block(name: str, value: int, minimum: int) -> int:
    """Return `value` if it is a power of two >= `minimum`, else raise ValueError (block sizes
    that tests and benchmarks pass to a launcher)."""
    if value < minimum or next_pow2(value) != value:
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value}")
    return value


def check_lora_args(
    y: Tensor, x: Tensor, A: Tensor, B: Tensor, scales: Tensor, meta: SlotMeta
) -> None:
    """Raise TypeError / ValueError unless the shapes, dtypes and devices fit y += s*(x A^T) B^T."""
    for name, t in (("y", y), ("x", x), ("A", A), ("B", B), ("scales", scales)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or y.dim() != 2 or A.dim() != 3 or B.dim() != 3 or scales.dim() != 1:
        raise ValueError(
            "expected y (T, d_out), x (T, d_in), A (S, R, d_in), B (S, d_out, R), scales (S,); "
            f"got y {tuple(y.shape)}, x {tuple(x.shape)}, A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}, scales {tuple(scales.shape)}"
        )
    T, d_in = x.shape
    S, R, _ = A.shape
    d_out = y.shape[1]
    if (
        y.shape[0] != T
        or meta.num_tokens != T
        or A.shape[2] != d_in
        or B.shape != (S, d_out, R)
        or scales.shape[0] != S
    ):
        raise ValueError(
            f"shape mismatch: meta has T={meta.num_tokens}, y {tuple(y.shape)}, "
            f"x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)} "
            f"(want (S={S}, d_out={d_out}, R={R})), scales {tuple(scales.shape)}"
        )
    if meta.max_slot >= S:
        raise ValueError(f"token slot {meta.max_slot} out of range for S={S} slots")
    dtype = x.dtype
    if not dtype.is_floating_point:
        raise TypeError(f"x must be floating point, got {dtype}")
    # CPU half activations may come with float32 weights: the torch path computes in fp32.
    w_dtypes = (dtype, torch.float32) if dtype in HALF_DTYPES and x.device.type == "cpu" else (
        dtype,
    )
    if y.dtype != dtype or A.dtype != B.dtype or A.dtype not in w_dtypes:
        raise TypeError(
            f"x, y, A, B must share one dtype (A and B may be float32 for CPU half x), got "
            f"x {dtype}, y {y.dtype}, A {A.dtype}, B {B.dtype}"
        )
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    dev = x.device
    if (
        y.device != dev
        or A.device != dev
        or B.device != dev
        or scales.device != dev
        or meta.token_slots.device != dev
    ):
        raise ValueError(
            f"all tensors must be on one device: x {dev}, y {y.device}, A {A.device}, "
            f"B {B.device}, scales {scales.device}, meta {meta.token_slots.device}"
        )
    if (d_out > 1 and y.stride(1) != 1) or (d_in > 1 and x.stride(1) != 1):
        raise ValueError(
            f"y and x need a contiguous last dim, got strides y {y.stride()}, x {x.stride()}"
        )


def check_deu_args(y: Tensor, h: Tensor, bank: Tensor, meta: SlotMeta) -> None:
    """Raise TypeError / ValueError unless the tensors fit y[t] += g_k * D_k(h[t])."""
    for name, t in (("y", y), ("h", h), ("bank", bank)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if y.dim() != 2 or h.shape != y.shape or bank.dim() != 3 or bank.shape[0] != N_PLANES:
        raise ValueError(
            f"expected y (T, F), h (T, F), bank ({N_PLANES}, S, F); got y {tuple(y.shape)}, "
            f"h {tuple(h.shape)}, bank {tuple(bank.shape)}"
        )
    if bank.shape[2] != y.shape[1] or meta.num_tokens != y.shape[0]:
        raise ValueError(
            f"shape mismatch: meta has T={meta.num_tokens}, y {tuple(y.shape)}, "
            f"bank {tuple(bank.shape)}"
        )
    if meta.max_slot >= bank.shape[1]:
        raise ValueError(f"token slot {meta.max_slot} out of range for S={bank.shape[1]} slots")
    if not y.dtype.is_floating_point or h.dtype != y.dtype:
        raise TypeError(f"y and h must share one floating dtype, got {y.dtype} and {h.dtype}")
    if bank.dtype != torch.float32:
        raise TypeError(f"bank must be float32, got {bank.dtype}")
    if not bank.is_contiguous():
        raise ValueError("bank must be contiguous")
    dev = y.device
    if h.device != dev or bank.device != dev or meta.token_slots.device != dev:
        raise ValueError(
            f"all tensors must be on one device: y {dev}, h {h.device}, bank {bank.device}, "
            f"meta {meta.token_slots.device}"
        )
    if y.shape[1] > 1 and (y.stride(1) != 1 or h.stride(1) != 1):
        raise ValueError(f"y and h need a contiguous last dim, got {y.stride()}, {h.stride()}")


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
