"""Plain-torch specifications of the batched multi-adapter ops (obviously correct, not fast)."""

from __future__ import annotations

import torch
from torch import Tensor

from hotlora.kernels.deu_params import (
    A_MAX,
    A_MIN,
    BETA_MAX,
    CLIP,
    GAMMA_MAX,
    GAMMA_MIN,
    OUT_MAX,
    PARAM_MAX,
)


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


def _critical_q(dtype: torch.dtype) -> float:
    """|q| below which deu_unit_reference uses the critically damped closed form.

    Near q = 0 the over-damped form cancels (A, B ~ 1 / sqrt(q) with A + B = c1): its error is
    ~2 eps / sqrt(q) relative to the terms' size, while the critical form is off by ~30 |q| for
    |t| <= CLIP (the under-damped form has no cancellation). The two balance at ~0.15 eps^(2/3):
    ~5e-12 in fp64 (error <= ~2e-10 of the terms' size), ~4e-6 in fp32.
    """
    return 0.15 * torch.finfo(dtype).eps ** (2.0 / 3.0)


def deu_unit_reference(t: Tensor, params: Tensor) -> Tensor:
    """D(t) of a y'' + b y' + c y = H(t), y(0) = c1, y'(0) = m c1 + c2 (m = -b / (2a)), by regime.

    params (6, n) rows [a, b, c, c1, c2, gain] broadcast over t's last dim (n); the gain is not
    applied. Textbook closed forms with an explicit branch per regime (the spec that the
    branch-free form in kernels/deu.py must match), after the same documented clamps. Computes in
    the promoted dtype of t and params (pass fp64 for a high-precision reference).
    """
    dtype = torch.promote_types(t.dtype, params.dtype)
    a_raw, b_raw, c_raw, c1, c2, _ = params.to(dtype).unbind(0)  # each (n,)
    a = a_raw.clamp(A_MIN, A_MAX)
    b = a * (b_raw / a).clamp(0.0, BETA_MAX)
    c = a * (c_raw / a).clamp(GAMMA_MIN, GAMMA_MAX)
    c1 = c1.clamp(-PARAM_MAX, PARAM_MAX)
    c2 = c2.clamp(-PARAM_MAX, PARAM_MAX)
    x = t.to(dtype).clamp(-CLIP, CLIP)  # (..., n)

    m = -b / (2 * a)  # (n,) the roots' common real part
    q = m * m - c / a  # (n,) (b^2 - 4ac) / (4a^2): sign picks the regime
    y0, v0 = c1, m * c1 + c2  # initial value and slope of the homogeneous part
    tiny = _critical_q(dtype)
    over, under = q > tiny, q < -tiny  # (n,) the rest is critically damped

    # Over-damped: real roots r1, r2; y_h = A e^(r1 t) + B e^(r2 t) fitted to (y0, v0); the step
    # response 1/c + (r2 e^(r1 t) - r1 e^(r2 t)) / (c (r1 - r2)) has zero value and slope at 0.
    s = torch.where(over, q, torch.ones_like(q)).sqrt()  # (n,) placeholder 1 off-regime
    r1, r2 = m + s, m - s
    e1, e2 = torch.exp(r1 * x), torch.exp(r2 * x)  # (..., n)
    y_h_over = ((v0 - r2 * y0) * e1 + (r1 * y0 - v0) * e2) / (r1 - r2)
    y_p_over = (1 + (r2 * e1 - r1 * e2) / (r1 - r2)) / c

    # Critically damped: double root m.
    em = torch.exp(m * x)
    y_h_crit = (c1 + c2 * x) * em
    y_p_crit = (1 - em * (1 - m * x)) / c

    # Under-damped: roots m +- i w.
    w = torch.where(under, -q, torch.ones_like(q)).sqrt()  # (n,)
    cos, sin = torch.cos(w * x), torch.sin(w * x)
    y_h_under = em * (c1 * cos + (c2 / w) * sin)
    y_p_under = (1 - em * (cos - (m / w) * sin)) / c

    y_h = torch.where(over, y_h_over, torch.where(under, y_h_under, y_h_crit))
    y_p = torch.where(over, y_p_over, torch.where(under, y_p_under, y_p_crit))
    y = torch.where(x > 0, y_h + y_p, y_h)  # H(0) = 0 (y_p(0) = 0 anyway)
    return y.clamp(-OUT_MAX, OUT_MAX)


def deu_reference(y: Tensor, h: Tensor, params: Tensor, token_slots: Tensor) -> Tensor:
    """out[t] = y[t] + g_k * D_k(h[t]) for k = token_slots[t] >= 0; k == -1 keeps y[t].

    Shapes: y, h (T, F), params (S, 6, F) rows [a, b, c, c1, c2, gain], token_slots (T,) int.
    Returns a new tensor in y's dtype; the unit is evaluated in the promoted dtype of h and params
    (pass fp64 tensors to get a high-precision reference).
    """
    out = y.clone()  # (T, F)
    slots = token_slots.to(device=y.device, dtype=torch.long)  # (T,)
    # Loop over distinct slots, never index with -1: params[-1] would alias the last slot.
    for k in torch.unique(slots[slots >= 0]).tolist():
        rows = torch.nonzero(slots == k).squeeze(1)  # (n,)
        gain = params[k, 5].clamp(-PARAM_MAX, PARAM_MAX)  # (F,)
        delta = gain * deu_unit_reference(h[rows], params[k])  # (n, F)
        out[rows] = out[rows] + delta.to(out.dtype)
    return out


def decode_attention_reference(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, lengths: Tensor, scale: float
) -> Tensor:
    """out[b, h] = softmax(scale * q[b, h] . K[rows[b], h // G, :lengths[b]]^T) @ V[same rows].

    Shapes: q (B, H, D), k_cache, v_cache (N_rows, H_kv, S, D), rows, lengths (B,) int,
    G = H // H_kv. One (b, h) at a time, in float64; returns float64 (B, H, D). Lengths are
    clamped to [0, S] as the kernels do, and a length of 0 gives zeros (an empty softmax).
    """
    B, H, D = q.shape
    G = H // k_cache.shape[1]
    out = torch.zeros((B, H, D), dtype=torch.float64, device=q.device)  # (B, H, D)
    for b, (row, n) in enumerate(zip(rows.tolist(), lengths.tolist(), strict=True)):
        n = max(n, 0)  # a negative slice end would count from the back; > S slices to S
        for h in range(H):
            k = k_cache[row, h // G, :n].double()  # (n, D)
            v = v_cache[row, h // G, :n].double()  # (n, D)
            w = torch.softmax(scale * (k @ q[b, h].double()), dim=0)  # (n,)
            out[b, h] = w @ v
    return out
