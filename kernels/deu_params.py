"""The DEU unit's parameter layout, safety clamps and stored planes (see kernels/deu.py for the
math they bound). A leaf module, so the torch op, the Triton kernel, the reference and the
argument checks share one definition without importing each other."""

from __future__ import annotations

# Parameter rows of a DEU parameter tensor (6, n): the paper's five and the gain.
PARAMS = ("a", "b", "c", "c1", "c2", "gain")
CLIP = 8.0
A_MIN, A_MAX = 1e-2, 1e2
BETA_MAX = 8.0  # b/a, so |m| <= 4
GAMMA_MIN, GAMMA_MAX = 1e-2, 16.0  # c/a, so r <= 4 in the oscillating regime
PARAM_MAX = 100.0  # |c1|, |c2|, |gain|
OUT_MAX = 100.0  # |D|, so g * D stays inside fp16's range
R_MIN = 1e-15  # floor of r: sinh(r t) / r == t to fp32 precision for every |t| <= CLIP
# |r t| below which S = t * sum_k (q t^2)^k / (2k+1)! (to k = 5: truncation < 1e-16 relative);
# above it the quotient's gradient loses at most ~3 eps / (r t)^2 = 48 eps to cancellation.
S_SERIES_RT = 0.25

# Per-neuron planes a serving slot stores, in this order (see deu.deu_planes).
PLANES = ("m", "r", "inv_r", "hyp", "c1", "c2", "inv_c", "m_inv_c", "gain")
N_PLANES = len(PLANES)
