"""The DEU unit (differential equation unit) and the batched per-slot DEU activation op.

Each neuron's unit y(t), t its pre-activation clipped to [-CLIP, CLIP], solves

    a * y''(t) + b * y'(t) + c * y(t) = H(t)          (H = Heaviside step)

with y(0) = c1 and y'(0) = m * c1 + c2, m = -b / (2a). One branch-free closed form covers the
over-, critically and under-damped regimes: with q = m^2 - c/a and r = sqrt(|q|),

    C(t) = cosh(r t) if q > 0 else cos(r t)        S(t) = sinh(r t) / r or sin(r t) / r
    y(t) = e^(m t) (c1 C + c2 S) + H(t) (1 - e^(m t) (C - m S)) / c

(S -> t as r -> 0: sinh comes from expm1, so the quotient's value stays exact down to the floor
R_MIN of r. When gradients are taken, S for |r t| < S_SERIES_RT is its Taylor series in q t^2,
whose derivative in q is exact, where the quotient's d/dr = (t C - S) / r cancels; r carries the
gradient dr/dq = +-1 / (2 r) through the floor.) A DEU adapter adds g * D(h) to GPT-2's GELU.

Safety for every finite input and parameter: a is clamped to [A_MIN, A_MAX], the ratios b/a and
c/a to [0, BETA_MAX] and [GAMMA_MIN, GAMMA_MAX] (still an exact solution, of the ODE with the
clamped coefficients), c1, c2 and g to +-PARAM_MAX and the output to +-OUT_MAX. Then
|m t|, |r t| <= 32, so every intermediate stays below ~1e32 in fp32: no Inf, no NaN, no 0 * Inf.

Serving never recomputes those per-neuron quantities: `deu_planes` turns a parameter set into
the PLANES a slot stores, and `deu_apply` evaluates each token with its own slot's planes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hotlora.kernels._common import TRITON_DTYPES, add_rows
from hotlora.kernels.checks import check_deu_args
from hotlora.kernels.deu_params import (
    A_MAX,
    A_MIN,
    BETA_MAX,
    CLIP,
    GAMMA_MAX,
    GAMMA_MIN,
    OUT_MAX,
    PARAM_MAX,
    R_MIN,
    S_SERIES_RT,
)
from hotlora.kernels.slot_meta import SlotMeta

# Gathering every token's planes costs N_PLANES copies of the activations; per-run broadcasting
# costs ~15 ops per run. Gather when runs are short (decode), broadcast when long (prefill).
_GATHER_MAX_TOKENS_PER_RUN = 4
# Rows per CPU evaluation: its ~30 temporaries of (rows, d_ff) then stay in cache. At d_ff = 3072
# (2 cores) 1024 prefill rows took 111 ms in one evaluation and 16 ms in chunks of 32 (chunks
# of 16 / 64: 18 / 22 ms); a 32-row decode batch is fastest whole.
_CPU_ROWS = 32


def deu_planes(params: Tensor) -> Tensor:
    """(6, n) parameters [a, b, c, c1, c2, gain] -> (N_PLANES, n) evaluation planes.

    Differentiable in every parameter (training evaluates the unit through this function).
    """
    a_raw, b, c_raw, c1, c2, g = params.unbind(0)  # each (n,)
    a = a_raw.clamp(A_MIN, A_MAX)
    beta = (b / a).clamp(0.0, BETA_MAX)  # b/a
    gamma = (c_raw / a).clamp(GAMMA_MIN, GAMMA_MAX)  # c/a
    m = -0.5 * beta
    q = m * m - gamma
    hyp = (q > 0).to(params.dtype)
    r0 = q.abs().clamp_min(R_MIN * R_MIN).sqrt()
    # Value r0, gradient dr/dq = +-1 / (2 r0) everywhere: sqrt's own is lost under the floor and
    # at q == 0 (abs'), where D still depends on q (deu_eval's series carries it as r^2 = +-q).
    r = r0.detach() + (q - q.detach()) * ((hyp - 0.5) / r0).detach()
    inv_c = 1.0 / (a * gamma)
    return torch.stack(
        [
            m,
            r,
            1.0 / r,
            hyp,
            c1.clamp(-PARAM_MAX, PARAM_MAX),
            c2.clamp(-PARAM_MAX, PARAM_MAX),
            inv_c,
            m * inv_c,
            g.clamp(-PARAM_MAX, PARAM_MAX),
        ]
    )  # (N_PLANES, n)


def deu_eval(x: Tensor, planes: Tensor) -> Tensor:
    """D(x) elementwise; planes (N_PLANES, ...) broadcast against x. Computes in planes' dtype."""
    m, r, inv_r, hyp, c1, c2, inv_c, m_inv_c, _ = planes.unbind(0)
    t = x.to(planes.dtype).clamp(-CLIP, CLIP)
    rt = r * t
    cos, sin = torch.cos(rt), torch.sin(rt)
    # With u = |rt| <= 32, ep = e^u - 1 (expm1) and w = 1 - e^-u = ep / (ep + 1) (in [0, 1)):
    # cosh - 1 = (ep - w) / 2 and sinh u = (ep + w) / 2, with no cancellation at small r t and
    # (unlike torch's CPU cosh / sinh, whose scalar tails round differently) the same bits at any
    # batch shape, so a row in a mixed batch equals the row alone. On the CPU the op count is the
    # cost: one transcendental here instead of two.
    ep = torch.expm1(rt.abs())
    w = ep / (ep + 1.0)
    # hyp is exactly 0 or 1, so these select one regime; cosh >= 1 >= |cos| keeps the
    # blend's rounding relative to the selected value.
    c_diff = torch.add(ep - w, cos, alpha=-2.0) + 2.0  # 2 (cosh - cos)
    C = torch.addcmul(cos, hyp, c_diff, value=0.5)
    s_diff = torch.add(torch.copysign(ep + w, rt), sin, alpha=-2.0)  # 2 (sinh - sin)
    S = torch.addcmul(sin, hyp, s_diff, value=0.5) * inv_r
    if torch.is_grad_enabled() and (x.requires_grad or planes.requires_grad):
        # Values are exact either way, but near r = 0 the quotient's gradient in r cancels
        # catastrophically (and q's reaches it through 1 / (2 r)); the series in
        # z = +-(r t)^2 = q t^2 has exact derivatives (see S_SERIES_RT). Serving skips it.
        z = (2.0 * hyp - 1.0) * (rt * rt)
        series = t * (
            1.0 + z / 6 * (1.0 + z / 20 * (1.0 + z / 42 * (1.0 + z / 72 * (1.0 + z / 110))))
        )
        S = torch.where(rt.abs() < S_SERIES_RT, series, S)
    em = torch.exp(m * t)
    # H(t) as 0 / 1 in t's dtype: a bool mask (t > 0) cost 2-3x the float ops in the
    # comparison and in both uses below, which promote it (measured at 32 x 1536 on the CPU).
    step = torch.sign(t).clamp_(min=0.0)
    # c1 E + c2 F + H (1 - E + m F) / c with E = e^(mt) C, F = e^(mt) S, grouped by E and F.
    k_c = inv_c * step
    inner = torch.addcmul(C * (c1 - k_c), S, torch.addcmul(c2, step, m_inv_c))
    return torch.addcmul(k_c, em, inner).clamp_(-OUT_MAX, OUT_MAX)


def deu_unit(x: Tensor, params: Tensor) -> Tensor:
    """D(x) for parameters (6, n) broadcast over x's last dim (n); differentiable in both."""
    return deu_eval(x, deu_planes(params))


def deu_activation(x: Tensor, params: Tensor) -> Tensor:
    """g * D(x): the delta a DEU adapter adds to a neuron's GELU output."""
    return _delta(x, deu_planes(params))


def deu_apply(y: Tensor, h: Tensor, bank: Tensor, meta: SlotMeta) -> None:
    """In place: y[t] += g_k * D_k(h[t]) for k = token_slots[t] >= 0; other rows untouched.

    y (T, F) holds the frozen activation GELU(h), so rows without a DEU adapter stay the base
    model's bit for bit; h (T, F) the pre-activations; bank (N_PLANES, S, F) float32 planes.
    CUDA runs the fused Triton kernel; everything else the torch path (fp32 math throughout).
    """
    check_deu_args(y, h, bank, meta)
    if meta.empty:
        return
    if y.is_cuda and y.dtype in TRITON_DTYPES:
        from hotlora.kernels.triton_deu import deu_add

        deu_add(y, h, bank, meta.token_slots)
        return
    if meta.per_token:
        _apply_per_token(y, h, bank, meta)
    elif meta.num_active <= _GATHER_MAX_TOKENS_PER_RUN * len(meta.run_starts_host):
        _apply_gathered(y, h, bank, meta)
    else:
        _apply_runs(y, h, bank, meta)


def _apply_gathered(y: Tensor, h: Tensor, bank: Tensor, meta: SlotMeta) -> None:
    """Each active token with its own slot's planes: gathered and evaluated _CPU_ROWS at a time."""
    tokens, slots = meta.active_tokens, meta.active_slots  # (N,), (N,)
    for i in range(0, meta.num_active, _CPU_ROWS):
        if meta.all_active:
            rows = slice(i, i + _CPU_ROWS)
            _add_delta(y[rows], h[rows], bank.index_select(1, slots[rows]))
        else:
            tok = tokens[i : i + _CPU_ROWS]
            delta = _delta(h.index_select(0, tok), bank.index_select(1, slots[i : i + _CPU_ROWS]))
            add_rows(y, tok, delta)


def _apply_per_token(y: Tensor, h: Tensor, bank: Tensor, meta: SlotMeta) -> None:
    """Every token with its slot's planes (slot 0 where it has none), _CPU_ROWS at a time; a
    select keeps the bits of rows without an adapter."""
    slots, active = meta.active_slots, meta.token_slots >= 0  # (T,), (T,)
    for i in range(0, meta.num_tokens, _CPU_ROWS):
        rows = slice(i, i + _CPU_ROWS)
        delta = _delta(h[rows], bank.index_select(1, slots[rows]))  # (n, F)
        y[rows] = torch.where(active[rows].unsqueeze(1), y[rows] + delta, y[rows])


def _apply_runs(y: Tensor, h: Tensor, bank: Tensor, meta: SlotMeta) -> None:
    """Per run [a, b) of slot k: the slot's planes broadcast over the run, _CPU_ROWS at a time."""
    for k, a, b in zip(meta.run_slots_host, meta.run_starts_host, meta.run_ends_host, strict=True):
        planes = bank[:, k, None, :]  # (P, 1, F)
        for i in range(a, b, _CPU_ROWS):
            rows = slice(i, min(i + _CPU_ROWS, b))
            _add_delta(y[rows], h[rows], planes)


def _delta(h: Tensor, planes: Tensor) -> Tensor:
    return planes[-1] * deu_eval(h, planes)  # (..., F): g * D(h), the serving and training delta


def _add_delta(y: Tensor, h: Tensor, planes: Tensor) -> None:
    """y += g * D(h) in place (y a view into the caller's rows); a half y takes the fp32
    delta and rounds once, with no conversion op."""
    # Not y.addcmul_: its fused multiply-add rounds differently in vector and scalar-tail
    # lanes, so a row's bits would depend on the batch around it.
    y += _delta(h, planes)
