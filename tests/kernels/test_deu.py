"""The DEU unit (kernels/deu.py) against its ODE, the textbook reference and autograd; the CPU op.

Error model used by every tolerance here: D's computed value is off by a few eps times the size
of its largest terms (`terms`: e^(mt) C (|c1| + 1/c) + e^(mt) |S| (|c2| + |m|/c) + 1/c), which
can exceed |D| by far (cancellation in the step response for small c, clamped huge values), so
tolerances are `units * eps * (1 + size)`; measured worst cases are ~16 units (fp32 and fp64).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from hotlora.kernels import (
    build_slot_meta,
    deu_activation,
    deu_apply,
    deu_planes,
    deu_reference,
    deu_unit,
    deu_unit_reference,
)
from hotlora.kernels.deu import _GATHER_MAX_TOKENS_PER_RUN, _apply_gathered, _apply_runs
from hotlora.kernels.deu_params import (
    A_MAX,
    A_MIN,
    BETA_MAX,
    CLIP,
    GAMMA_MAX,
    GAMMA_MIN,
    N_PLANES,
    OUT_MAX,
    PARAM_MAX,
)
from hotlora.kernels.slot_meta import SlotMeta
from tests.kernels.lora_cases import PATTERNS, make_slots

F64 = torch.float64
EPS64 = torch.finfo(F64).eps
# Error of D in units of eps * (1 + terms) (see the module docstring): measured <= ~16.
UNIT_TOL = {torch.float64: 64.0, torch.float32: 64.0}
REGIMES = ("over", "critical", "under")
# Dyadic |m| values: with a a power of two, b = 2a|m| and c = a m^2 are exact, so q = 0 exactly.
_DYADIC_M = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 3.5)


# --- cases ------------------------------------------------------------------------------------


def make_params(regime: str, n: int, seed: int = 0, q: float = 0.0) -> Tensor:
    """(6, n) fp64 parameters [a, b, c, c1, c2, gain] of one regime, inside the clamp ranges.

    "near": dyadic a and m with c/a = m^2 - q exactly representable (q may be 0 or one ulp), so
    the unit's q is the requested one. "mixed": every regime, a and the ratios also past their
    clamps.
    """
    g = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float) -> Tensor:
        return torch.empty(n, dtype=F64).uniform_(lo, hi, generator=g)

    if regime in ("critical", "near"):
        a = 2.0 ** torch.randint(-3, 3, (n,), generator=g).to(F64)
        m = torch.tensor(_DYADIC_M, dtype=F64)[torch.randint(0, len(_DYADIC_M), (n,), generator=g)]
        beta, gamma = 2 * m, m * m - (q if regime == "near" else 0.0)
    else:
        a = torch.exp(u(-2.0, 2.0))
        if regime == "over":
            beta = u(1.0, 7.5)
            gamma = (beta / 2) ** 2 * u(0.05, 0.9)
        elif regime == "under":
            beta = u(0.0, 7.5)
            gamma = (beta / 2) ** 2 + (GAMMA_MAX - (beta / 2) ** 2) * u(0.05, 0.95)
        elif regime == "mixed":
            a = torch.exp(u(-6.0, 6.0))
            beta = u(-1.0, 1.2 * BETA_MAX)
            gamma = torch.exp(u(-6.0, 3.5))
        else:
            raise ValueError(regime)
    return torch.stack([a, a * beta, a * gamma, u(-3, 3), u(-3, 3), u(-2, 2)])  # (6, n)


def make_t(rows: int, n: int, seed: int = 0) -> Tensor:
    """(rows, n) fp64 pre-activations: 0, tiny, +-CLIP and past it, then uniform over the range."""
    g = torch.Generator().manual_seed(seed + 1000)
    t = torch.empty(rows, n, dtype=F64).uniform_(-CLIP - 1, CLIP + 1, generator=g)
    special = [0.0, 1e-300, -1e-300, 1e-9, -1e-9, CLIP, -CLIP, CLIP + 1, -CLIP - 1]
    k = min(rows, len(special))
    t[:k] = torch.tensor(special[:k], dtype=F64)[:, None]
    return t


def clamped(params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(a, b, c, c1, c2) after the documented clamps, fp64."""
    a_raw, b_raw, c_raw, c1, c2, _ = params.to(F64).unbind(0)
    a = a_raw.clamp(A_MIN, A_MAX)
    b = a * (b_raw / a).clamp(0.0, BETA_MAX)
    c = a * (c_raw / a).clamp(GAMMA_MIN, GAMMA_MAX)
    return a, b, c, c1.clamp(-PARAM_MAX, PARAM_MAX), c2.clamp(-PARAM_MAX, PARAM_MAX)


def terms(t: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    """(q (n,), size (..., n)): the regime discriminant and the size of D's largest terms at t."""
    a, b, c, c1, c2 = clamped(params)
    m = -b / (2 * a)
    q = m * m - c / a
    x = t.to(F64).clamp(-CLIP, CLIP)
    s = q.clamp_min(0).sqrt()
    hyp = q > 0
    C = torch.where(hyp, torch.cosh(s * x), torch.ones_like(x))
    S = torch.where(hyp, torch.sinh(s * x.abs()) / torch.where(hyp, s, 1.0), x.abs())
    kc = (x > 0).to(F64) / c
    return q, kc + torch.exp(m * x) * (C * (c1.abs() + kc) + S * (c2.abs() + m.abs() * kc))


def reference_error(q: Tensor) -> Tensor:
    """Relative error bound (of the terms' size) of the fp64 reference itself near q = 0.

    Over-damped form: ~2 eps / sqrt|q| (its two exponentials cancel); critical form, used for
    |q| below a threshold, ~30 |q|. Each bound holds on its own side, the smaller is the one
    in force (measured: 1.7 eps / sqrt|q| and 24 |q|).
    """
    qa = q.abs()
    return torch.minimum(8 * EPS64 / qa.sqrt().clamp_min(1e-300), 100 * qa)


def make_bank(params: Tensor) -> Tensor:
    """(S, 6, F) parameters -> (N_PLANES, S, F) float32 serving bank."""
    planes = [deu_planes(params[k].float()) for k in range(params.shape[0])]
    return torch.stack(planes, dim=1).contiguous()  # (P, S, F)


def tiny_r_case(
    dtype: torch.dtype = torch.float32, F: int = 16, T: int = 24
) -> tuple[Tensor, Tensor, Tensor, list[int], Tensor, Tensor]:
    """(h in dtype, params, bank, slots, want, tol) for planes with r ~ 0, where S(t) must be t.

    Three exactly critical slots with c1 = 0 and gain 1 (D = e^(mt) c2 t + step response), whose
    planes put r near 0 in both branches: slot 0 as deu_planes leaves it (q == 0: trig branch,
    r = R_MIN), slot 1 with hyp forced to 1 (sinh(R_MIN t) / R_MIN), slot 2 hyperbolic with
    r = 1e-8 (q = 1e-16). A sinh built as (e^rt - e^-rt) / 2 returns 0 or noise for these.
    """
    params = torch.stack([make_params("near", F, seed=5 + k, q=0.0) for k in range(3)]).float()
    params[:, 3] = 0.0  # c1
    params[:, 5] = 1.0  # gain
    bank = make_bank(params)  # (P, 3, F)
    bank[3, 1:] = 1.0  # hyp
    bank[1, 2], bank[2, 2] = 1e-8, 1e8  # r, inv_r
    h = make_t(T, F, seed=2).to(dtype)
    slots = [k % 3 for k in range(T)]
    want = torch.empty(T, F, dtype=F64)
    tol = torch.empty(T, F, dtype=F64)
    for k in range(3):
        a, b, c, _, c2 = clamped(params[k])
        m = -b / (2 * a)
        x = h[k::3].double().clamp(-CLIP, CLIP)
        em = torch.exp(m * x)
        want[k::3] = (em * c2 * x + (x > 0) * (1 - em * (1 - m * x)) / c).clamp(-OUT_MAX, OUT_MAX)
        _, size = terms(x, params[k])
        tol[k::3] = UNIT_TOL[torch.float32] * torch.finfo(torch.float32).eps * (1 + size)
    tol += 2 * torch.finfo(dtype).eps * want.abs()  # the result stored in dtype
    return h, params, bank, slots, want, tol


def make_op_case(
    T: int, F: int, S: int, pattern: str, dtype: torch.dtype, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """y, h (T, F) in dtype, params (S, 6, F) fp32 (mixed regimes), slots: one batch of the op."""
    g = torch.Generator().manual_seed(seed)
    params = torch.stack([make_params("mixed", F, seed=seed + k) for k in range(S)]).float()
    y = torch.randn(T, F, generator=g, dtype=F64).to(dtype)
    h = (torch.randn(T, F, generator=g, dtype=F64) * 4).to(dtype)
    return y, h, params, make_slots(pattern, T, S, seed)


def op_expected(
    y: Tensor, h: Tensor, params: Tensor, slots: list[int], units: float = UNIT_TOL[torch.float32]
) -> tuple[Tensor, Tensor]:
    """(expected (T, F) fp64, tolerance (T, F)) for y += g D(h) computed in fp32, stored in y's
    dtype: fp32 math error `units * eps * |g| (1 + size)` plus two roundings to y's dtype
    (of the delta and of the sum); rows with slot -1 get tolerance 0 (bit-exact)."""
    ref = deu_reference(y.double(), h.double(), params.double(), torch.tensor(slots))
    tol = torch.zeros_like(ref)
    eps_y = torch.finfo(y.dtype).eps
    for k in sorted({s for s in slots if s >= 0}):
        rows = [i for i, s in enumerate(slots) if s == k]
        _, size = terms(h[rows].double(), params[k].double())
        gain = params[k, 5].double().abs()
        math_err = units * torch.finfo(torch.float32).eps * gain * (1 + size)
        delta = (ref[rows] - y[rows].double()).abs()
        tol[rows] = math_err + eps_y * (2 * delta + y[rows].double().abs()) + 1e-30
    return ref, tol


def assert_op_close(out: Tensor, ref: Tensor, tol: Tensor, slots: list[int]) -> None:
    err = (out.double() - ref).abs()
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())} elements off; worst err {err[bad].max().item():.3g} "
        f"(tol there {tol[bad][err[bad].argmax()].item():.3g})"
    )
    inactive = [i for i, s in enumerate(slots) if s < 0]
    assert torch.equal(out[inactive].double(), ref[inactive])


def gathers(meta: SlotMeta) -> bool:
    """Which torch strategy deu_apply picks for this meta (mirrors its dispatch rule)."""
    return meta.num_active <= _GATHER_MAX_TOKENS_PER_RUN * len(meta.run_starts_host)


# --- the ODE and its initial conditions --------------------------------------------------------

# (a, b, c, c1, c2, t range): b^2 - 4ac > 0, == 0 exactly, < 0; ranges keep |D| < OUT_MAX.
ODE_CASES = {
    "over": [(2.0, 3.0, 1.0, 0.5, -0.7, -4.0), (0.5, 2.0, 0.3, -2.0, 3.0, -0.8)],
    "critical": [(0.5, 1.0, 0.5, 0.5, -0.7, -3.0), (4.0, 2.0, 0.25, 1.5, 2.0, -4.0)],
    "under": [(1.0, 0.4, 4.0, 0.5, -0.7, -8.0), (0.25, 0.1, 4.0, -3.0, 1.0, -8.0)],
}


def _ode_params(a: float, b: float, c: float, c1: float, c2: float) -> Tensor:
    return torch.tensor([[a], [b], [c], [c1], [c2], [1.0]], dtype=F64)  # (6, 1)


@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("regime", REGIMES)
def test_unit_solves_the_ode(regime: str, case: int) -> None:
    """a y'' + b y' + c y = H(t) by central differences on both sides of the kink at t = 0.

    Tolerance: rounding of the 3-point stencils, (4a / h^2 + b / h + c) * delta with delta the
    value error (16 eps of the terms' size), plus truncation h^2 (a y'''' / 12 + b y''' / 6) with
    |y^(k)| <= rho^k (1 + size), rho = |m| + sqrt|q| the largest root's size. With h = 1e-4 the
    rounding part dominates (~3e-6 of the terms' size for a = 2).
    """
    a, b, c, c1, c2, lo = ODE_CASES[regime][case]
    assert (b * b - 4 * a * c > 0, b * b == 4 * a * c, b * b - 4 * a * c < 0)[REGIMES.index(regime)]
    p = _ode_params(a, b, c, c1, c2)
    h = 1e-4
    t = torch.linspace(max(lo, -CLIP + 5 * h), CLIP - 5 * h, 401, dtype=F64)
    t = t[t.abs() > 5 * h][:, None]  # (N, 1) the stencil stays on one side of the kink
    y0, yp, ym = deu_unit(t, p), deu_unit(t + h, p), deu_unit(t - h, p)
    assert y0.abs().max() < 0.9 * OUT_MAX, "case leaves the unclamped range"
    d1, d2 = (yp - ym) / (2 * h), (yp - 2 * y0 + ym) / (h * h)
    residual = a * d2 + b * d1 + c * y0 - (t > 0).to(F64)

    q, size = terms(t, p)
    rho = b / (2 * a) + q.abs().sqrt()
    delta = 16 * EPS64 * (1 + size)  # the measured worst value error (module docstring)
    trunc = h * h * (a * rho**4 / 12 + b * rho**3 / 6) * (1 + size)
    tol = (4 * a / h**2 + b / h + c) * delta + trunc
    assert (residual.abs() <= tol).all(), f"max residual {residual.abs().max():.3g}"
    # Teeth: the same check fails for an ODE whose c is 1% off.
    wrong = a * d2 + b * d1 + 1.01 * c * y0 - (t > 0).to(F64)
    assert (wrong.abs() > tol).any()


@pytest.mark.parametrize("regime", [*REGIMES, "mixed"])
def test_initial_value_and_slope(regime: str) -> None:
    """y(0) == c1 exactly; y'(0+) == y'(0-) == m c1 + c2 (2nd-order one-sided differences).

    Tolerance: truncation h^2 |y'''| / 3 <= 1e-10 rho^3 (1 + size) plus rounding ~4 delta / h,
    with h = 1e-5 and rho <= 8: 5e-8 (1 + size) covers both.
    """
    p = make_params(regime, 32, seed=3)
    a, b, c, c1, c2 = clamped(p)
    m = -b / (2 * a)
    zero = torch.zeros(1, 32, dtype=F64)
    assert torch.equal(deu_unit(zero, p)[0], c1)
    assert torch.equal(deu_unit(zero.float(), p.float())[0], c1.float())
    h = 1e-5
    slope = m * c1 + c2
    _, size = terms(zero + 2 * h, p)  # includes the step response's 1 / c
    tol = 5e-8 * (1 + size[0] + (m.abs() + (m * m - c / a).abs().sqrt()) ** 3)
    for side in (1.0, -1.0):
        y1, y2 = deu_unit(zero + side * h, p)[0], deu_unit(zero + 2 * side * h, p)[0]
        one_sided = (-3 * c1 + 4 * y1 - y2) / (2 * side * h)
        assert ((one_sided - slope).abs() <= tol).all(), (one_sided - slope).abs().max()
    # Autograd agrees at t = 0 and just beside it (y_p's slope is O(t) there).
    for t0 in (0.0, 1e-12, -1e-12):
        x = torch.full((1, 32), t0, dtype=F64, requires_grad=True)
        (grad,) = torch.autograd.grad(deu_unit(x, p).sum(), x)
        torch.testing.assert_close(grad[0], slope, rtol=1e-9, atol=1e-9)


# --- branch-free form vs the textbook reference ----------------------------------------------

SWEEP = [
    *[(r, 0.0) for r in (*REGIMES, "mixed")],
    *[("near", s * q) for q in (1e-4, 1e-8, 1e-11, 1e-13, 1e-16) for s in (1.0, -1.0)],
]


def _sweep_id(case: tuple[str, float]) -> str:
    return case[0] if case[0] != "near" else f"q={case[1]:+.0e}"


@pytest.mark.parametrize("case", SWEEP, ids=_sweep_id)
def test_unit_matches_reference_fp64(case: tuple[str, float]) -> None:
    """Tight: 64 eps of the terms' size, plus the reference's own error near q = 0."""
    regime, q_req = case
    p = make_params(regime, 96, seed=SWEEP.index(case), q=q_req)
    t = make_t(48, 96)
    q, size = terms(t, p)
    if regime == "near":  # the requested q is the unit's q (q = 1e-16 is a few ulps)
        assert (q.abs() <= 2 * abs(q_req) + 1e-15).all() and (q != 0).any()
    out, ref = deu_unit(t, p), deu_unit_reference(t, p)
    tol = (UNIT_TOL[F64] * EPS64 + reference_error(q)) * (1 + size)
    err = (out - ref).abs()
    assert (err <= tol).all(), f"worst err/tol {(err / tol).max():.3g}"


def test_tiny_r_gives_s_equal_t() -> None:
    """q == 0 (r floored at R_MIN) and q of a few ulps: S(t) = t, D = e^(mt) c2 t + H(t) y_p."""
    for q in (0.0, 1e-16, -1e-16):
        p = make_params("near", 16, seed=5, q=q)
        p[3] = 0.0  # c1 = 0 leaves the S term and the step response
        t = make_t(32, 16)
        a, b, c, _, c2 = clamped(p)
        m = -b / (2 * a)
        x = t.clamp(-CLIP, CLIP)
        em = torch.exp(m * x)
        want = (em * c2 * x + (x > 0) * (1 - em * (1 - m * x)) / c).clamp(-OUT_MAX, OUT_MAX)
        torch.testing.assert_close(deu_unit(t, p), want, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("batch", ["gathered", "runs"])
def test_apply_tiny_r_planes(batch: str) -> None:
    """The serving path with r ~ 0 planes in both branches (see tiny_r_case)."""
    h, _, bank, slots, want, tol = tiny_r_case()
    if batch == "runs":
        order = sorted(range(len(slots)), key=lambda i: slots[i])
        h, want, tol, slots = h[order], want[order], tol[order], [slots[i] for i in order]
    meta = build_slot_meta(slots, "cpu")
    assert gathers(meta) == (batch == "gathered")
    out = torch.zeros_like(h)
    deu_apply(out, h, bank, meta)
    assert ((out.double() - want).abs() <= tol).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("regime", [*REGIMES, "mixed", "near"])
def test_unit_dtype_tolerance(regime: str, dtype: torch.dtype) -> None:
    """deu_unit computed in dtype vs the fp64 reference on the same (dtype-rounded) inputs."""
    p = make_params(regime, 128, seed=11, q=1e-6).to(dtype)
    t = make_t(64, 128, seed=11).to(dtype)
    q, size = terms(t, p)
    out = deu_unit(t, p)
    assert out.dtype == dtype
    ref = deu_unit_reference(t.double(), p.double())
    tol = (UNIT_TOL[dtype] * torch.finfo(dtype).eps + reference_error(q)) * (1 + size)
    err = (out.double() - ref).abs()
    assert (err <= tol).all(), f"worst err/tol {(err / tol).max():.3g}"


def test_half_inputs_compute_in_params_dtype() -> None:
    p = make_params("mixed", 32, seed=2).float()
    t = make_t(16, 32).half()
    assert deu_unit(t, p).dtype == torch.float32
    torch.testing.assert_close(deu_unit(t, p), deu_unit(t.float(), p), rtol=0, atol=0)


# --- gradients --------------------------------------------------------------------------------

GRAD_CASES = {
    "over": (2.0, 3.0, 1.0),
    "critical": (0.5, 1.0, 0.5),  # q == 0 exactly: r sits on its floor
    "near": (1.0, 2.0, 1.0 - 2.0**-30),  # q = 2^-30 > 0, r t << 1
    "under": (1.0, 0.4, 4.0),
}


@pytest.mark.parametrize("regime", list(GRAD_CASES))
def test_gradcheck(regime: str) -> None:
    """d(g D)/d(x, a, b, c, c1, c2, g) vs finite differences, fp64; x away from 0 and +-CLIP."""
    a, b, c = GRAD_CASES[regime]
    n = 3
    p = torch.tensor(
        [[a, a * 1.1, a * 0.9], [b, b * 1.1, b * 0.9], [c, c * 1.1, c * 0.9]], dtype=F64
    )
    if regime in ("critical", "near"):  # keep the exact (near-)critical ratios in every column
        p = torch.tensor([[a] * n, [b] * n, [c] * n], dtype=F64) * torch.tensor([1.0, 0.5, 2.0])
    rest = torch.tensor([[0.5, -1.2, 2.0], [-0.7, 0.3, 1.5], [1.3, -0.8, 0.6]], dtype=F64)
    params = torch.cat([p, rest]).requires_grad_()  # (6, 3)
    x = torch.tensor(
        [[-2.5, -0.7, 1.9], [0.6, 2.2, -1.1], [3.1, -1.7, 0.4], [-0.3, 1.2, 2.7]], dtype=F64
    ).requires_grad_()
    assert deu_activation(x, params).abs().max() < 0.5 * OUT_MAX
    assert torch.autograd.gradcheck(deu_activation, (x, params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "q", [0.0, 2.0**-40, -(2.0**-40), 2.0**-24, -(2.0**-24), 1e-3, -1e-3], ids=lambda q: f"{q:+.0e}"
)
def test_fp32_gradients_near_critical(q: float) -> None:
    """fp32 autograd matches fp64 near q = 0 (sinh(rt) / r's own d/dr cancels there)."""
    p64 = make_params("near", 64, seed=13, q=q)
    t64 = make_t(16, 64, seed=13).clamp(-3.0, 3.0)
    grads = {}
    for dtype in (torch.float32, F64):
        p = p64.to(dtype).requires_grad_()
        x = t64.to(dtype).requires_grad_()
        grads[dtype] = torch.autograd.grad(deu_activation(x, p).sum(), (x, p))
    for g32, g64 in zip(grads[torch.float32], grads[F64], strict=True):
        scale = g64.abs().max()
        torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-4 * float(scale))


# --- robustness -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_no_nan_or_inf_anywhere(dtype: torch.dtype) -> None:
    """Values and gradients stay finite for every extreme input and parameter; |g D| bounded."""
    big = torch.finfo(torch.float32).max
    coeffs = [-1e30, -1.0, 0.0, 1e-30, 1e-3, 1.0, 1e3, 1e30]
    consts = [0.0, 1e30, -1e30, 1.0]
    grid = torch.cartesian_prod(
        *[torch.tensor(v, dtype=F64) for v in (coeffs,) * 3 + (consts,) * 3]
    )
    params = grid.T.contiguous().to(dtype).requires_grad_()  # (6, n): 8^3 * 4^3 neurons
    xs = [0.0, 1e-30, -1e-30, 1e-7, -1e-7, CLIP, -CLIP, 1e30, -1e30, big, -big, 3.0, -3.0]
    xs += [math.inf, -math.inf]
    x = torch.tensor(xs, dtype=F64)[:, None].expand(-1, params.shape[1]).to(dtype)
    x = x.contiguous().requires_grad_()
    out = deu_activation(x, params)
    assert torch.isfinite(out).all()
    assert out.abs().max() <= OUT_MAX * PARAM_MAX
    gx, gp = torch.autograd.grad(out.sum(), (x, params))
    assert torch.isfinite(gx).all() and torch.isfinite(gp).all()
    assert torch.isfinite(deu_planes(params.detach())).all()
    ref = deu_unit_reference(x.detach(), params.detach())
    assert torch.isfinite(ref).all()


# --- the batched op: CPU torch path vs the reference --------------------------------------------

OP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("T", [1, 7, 40])
def test_apply_patterns(pattern: str, T: int, dtype: torch.dtype) -> None:
    S = max(T, 4) if pattern == "distinct" else 4
    y, h, params, slots = make_op_case(T, 24, S, pattern, dtype, seed=T)
    meta = build_slot_meta(slots, "cpu")
    out = y.clone()
    deu_apply(out, h, make_bank(params), meta)
    assert_op_close(out, *op_expected(y, h, params, slots), slots)


@pytest.mark.parametrize("strategy", ["gathered", "runs"])
@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p != "none"])
def test_each_strategy_on_each_pattern(strategy: str, pattern: str) -> None:
    """Both torch strategies are right for every pattern, whichever deu_apply would pick; 70
    tokens cross the CPU path's 32-row chunks mid-run."""
    S = 70 if pattern == "distinct" else 5
    y, h, params, slots = make_op_case(70, 40, S, pattern, torch.float32, seed=7)
    meta = build_slot_meta(slots, "cpu")
    out = y.clone()
    (_apply_gathered if strategy == "gathered" else _apply_runs)(out, h, make_bank(params), meta)
    assert_op_close(out, *op_expected(y, h, params, slots), slots)


def test_patterns_select_each_strategy() -> None:
    """Decode-like patterns gather, prefill-like runs broadcast (so both are exercised above)."""
    assert gathers(build_slot_meta(make_slots("interleaved", 40, 4), "cpu"))
    assert gathers(build_slot_meta(make_slots("distinct", 8, 8), "cpu"))
    assert not gathers(build_slot_meta(make_slots("runs", 40, 4), "cpu"))
    assert not gathers(build_slot_meta(make_slots("one_slot", 40, 4), "cpu"))


def test_identity_at_zero_gain() -> None:
    """g = 0 adds exactly nothing, even for extreme other parameters and inputs."""
    y, h, params, slots = make_op_case(16, 32, 3, "many", torch.float32)
    params[:, 3:5] = 1e30  # c1, c2 clamp to PARAM_MAX, D clamps to OUT_MAX
    params[:, 5] = 0.0
    h[0] = 1e30
    for dtype in (torch.float32, torch.float16):
        out = y.to(dtype)
        deu_apply(out, h.to(dtype), make_bank(params), build_slot_meta(slots, "cpu"))
        assert torch.equal(out, y.to(dtype))


def test_all_zero_planes_add_nothing() -> None:
    """The engine parks layers an adapter does not cover as all-zero planes."""
    y, h, _, slots = make_op_case(9, 16, 2, "many", torch.float32)
    out = y.clone()
    deu_apply(out, h, torch.zeros(N_PLANES, 2, 16), build_slot_meta(slots, "cpu"))
    assert torch.equal(out, y)


def test_mixed_batch_rows_equal_rows_alone() -> None:
    """Every row of a mixed batch gets what it gets when it runs alone (and -1 rows nothing)."""
    y, h, params, slots = make_op_case(40, 24, 4, "many", torch.float32, seed=4)
    bank = make_bank(params)
    decode, prefill = slots[:13], sorted(slots)  # the gathered and the run-wise strategy
    assert gathers(build_slot_meta(decode, "cpu")) and not gathers(build_slot_meta(prefill, "cpu"))
    for batch in (decode, prefill):
        T = len(batch)
        out = y[:T].clone()
        deu_apply(out, h[:T], bank, build_slot_meta(batch, "cpu"))
        for i, k in enumerate(batch):
            alone = y[i : i + 1].clone()
            deu_apply(alone, h[i : i + 1], bank, build_slot_meta([k], "cpu"))
            assert torch.equal(out[i : i + 1], alone), (i, k)


def test_row_strided_views() -> None:
    """y and h may be row-strided views; columns around them are never touched."""
    y, h, params, slots = make_op_case(40, 24, 3, "interleaved", torch.float32)
    y_big = torch.zeros(40, 40)
    y_big[:, 8:32] = y
    h_big = torch.zeros(40, 30)
    h_big[:, 3:27] = h
    for batch in (slots, sorted(slots)):  # gathered, runs
        out = y_big.clone()
        deu_apply(out[:, 8:32], h_big[:, 3:27], make_bank(params), build_slot_meta(batch, "cpu"))
        assert torch.equal(out[:, :8], y_big[:, :8]) and torch.equal(out[:, 32:], y_big[:, 32:])
        assert_op_close(out[:, 8:32], *op_expected(y, h, params, batch), batch)


def test_reference_does_not_alias_last_slot() -> None:
    y, h, params, _ = make_op_case(4, 8, 3, "none", F64)
    out = deu_reference(y, h, params.double(), torch.tensor([-1, 2, -1, -1]))
    assert torch.equal(out[[0, 2, 3]], y[[0, 2, 3]])
    p = params[2].double()
    torch.testing.assert_close(out[1], y[1] + p[5] * deu_unit_reference(h[1], p), rtol=0, atol=0)


# --- validation ------------------------------------------------------------------------------


def _good() -> dict[str, object]:
    y, h, params, slots = make_op_case(4, 6, 3, "many", torch.float32)
    return {"y": y, "h": h, "bank": make_bank(params), "meta": build_slot_meta(slots, "cpu")}


BAD = {
    "not_tensor": (lambda a: {**a, "h": a["h"].tolist()}, TypeError),
    "bank_planes": (lambda a: {**a, "bank": a["bank"][:-1]}, ValueError),
    "bank_2d": (lambda a: {**a, "bank": a["bank"][0]}, ValueError),
    "bank_F": (lambda a: {**a, "bank": a["bank"][:, :, :5].contiguous()}, ValueError),
    "h_shape": (lambda a: {**a, "h": a["h"][:3]}, ValueError),
    "y_1d": (lambda a: {**a, "y": a["y"][0], "h": a["h"][0]}, ValueError),
    "meta_T": (lambda a: {**a, "meta": build_slot_meta([0] * 5, "cpu")}, ValueError),
    "slot_out_of_range": (
        lambda a: {**a, "meta": build_slot_meta([0, 3, 1, 1], "cpu")},
        ValueError,
    ),
    "dtype_mismatch": (lambda a: {**a, "h": a["h"].double()}, TypeError),
    "int_y": (lambda a: {**a, "y": a["y"].int(), "h": a["h"].int()}, TypeError),
    "bank_dtype": (lambda a: {**a, "bank": a["bank"].double()}, TypeError),
    "bank_not_contiguous": (
        lambda a: {**a, "bank": a["bank"].transpose(1, 2).contiguous().transpose(1, 2)},
        ValueError,
    ),
    "y_last_dim_strided": (lambda a: {**a, "y": torch.zeros(4, 12)[:, ::2]}, ValueError),
    "h_last_dim_strided": (lambda a: {**a, "h": torch.zeros(4, 12)[:, ::2]}, ValueError),
    "device": (lambda a: {**a, "bank": a["bank"].to("meta")}, ValueError),
}


@pytest.mark.parametrize("name", list(BAD))
def test_validation(name: str) -> None:
    edit, err = BAD[name]
    args = edit(_good())
    y_before = args["y"].clone() if isinstance(args["y"], Tensor) else None
    with pytest.raises(err):
        deu_apply(**args)
    if y_before is not None:
        assert torch.equal(args["y"], y_before)
