"""Triton DEU kernel (kernels/triton_deu.py) vs the fp64 reference and the torch path.

Without a GPU these run under TRITON_INTERPRET=1 (set in tests/conftest.py) on CPU tensors; the
interpreter costs milliseconds per program, so shapes stay small. Tests marked ``gpu`` compile
the kernel for real (bf16, GPT-2 shapes, int64 offsets) and skip without CUDA. Cases, error model
and tolerances are shared with test_deu.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from hotlora.kernels import build_slot_meta, deu_apply
from hotlora.kernels.deu_params import N_PLANES
from hotlora.kernels.triton_deu import deu_add
from tests.kernels.test_deu import (
    assert_op_close,
    make_bank,
    make_op_case,
    op_expected,
    tiny_r_case,
)

INTERP_DTYPES = (torch.float32, torch.float16)  # bf16 is broken in the interpreter
INTERP_PATTERNS = ("none", "interleaved", "one_slot", "many", "runs")


def _run(
    y: Tensor, h: Tensor, params: Tensor, slots: list[int], **blocks: int
) -> tuple[Tensor, Tensor]:
    """(out, bank): y + g D(h) by the kernel, on y's device."""
    bank = make_bank(params).to(y.device)
    out = y.clone()
    deu_add(out, h, bank, torch.tensor(slots, device=y.device), **blocks)
    return out, bank


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", INTERP_PATTERNS)
@pytest.mark.parametrize("F", [7, 64, 130])
@pytest.mark.parametrize("T", [1, 5, 33])
def test_matches_reference(T: int, F: int, pattern: str, dtype: torch.dtype) -> None:
    """Default blocks: partial token and feature blocks exercise every mask."""
    y, h, params, slots = make_op_case(T, F, 3, pattern, dtype, seed=T + F)
    out, _ = _run(y, h, params, slots)
    assert_op_close(out, *op_expected(y, h, params, slots), slots)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_small_blocks_and_skipped_token_blocks(dtype: torch.dtype) -> None:
    """2-token blocks: whole blocks of slot -1 are skipped, their neighbours still written."""
    y, h, params, slots = make_op_case(12, 20, 3, "many", dtype, seed=3)
    slots[4:8] = [-1] * 4
    out, _ = _run(y, h, params, slots, block_t=2, block_f=8)
    assert_op_close(out, *op_expected(y, h, params, slots), slots)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_same_as_torch_path(dtype: torch.dtype) -> None:
    """Kernel and CPU torch path evaluate one fp32 formula: a few ulps of the terms apart."""
    y, h, params, slots = make_op_case(33, 64, 3, "many", dtype, seed=9)
    out, bank = _run(y, h, params, slots)
    torch_out = y.clone()
    deu_apply(torch_out, h, bank, build_slot_meta(slots, "cpu"))
    _, tol = op_expected(y, h, params, slots, units=8.0)
    assert ((out.double() - torch_out.double()).abs() <= tol).all()


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_tiny_r_gives_s_equal_t(dtype: torch.dtype) -> None:
    """r ~ 0 in both branches (see tiny_r_case): S(t) must be t, not a cancelled exp difference."""
    h, _, bank, slots, want, tol = tiny_r_case(dtype)
    out = torch.zeros_like(h)
    deu_add(out, h, bank, torch.tensor(slots))
    assert ((out.double() - want).abs() <= tol).all()


def test_zero_gain_and_zero_planes_add_nothing() -> None:
    y, h, params, slots = make_op_case(9, 40, 3, "many", torch.float16, seed=1)
    params[:, 5] = 0.0
    out, _ = _run(y, h, params, slots)
    assert torch.equal(out, y)
    out = y.clone()
    deu_add(out, h, torch.zeros(N_PLANES, 3, 40), torch.tensor(slots))
    assert torch.equal(out, y)


def test_int32_slots() -> None:
    y, h, params, slots = make_op_case(6, 24, 3, "interleaved", torch.float32)
    out = y.clone()
    deu_add(out, h, make_bank(params), torch.tensor(slots, dtype=torch.int32))
    assert_op_close(out, *op_expected(y, h, params, slots), slots)


def test_row_strided_views() -> None:
    y, h, params, slots = make_op_case(7, 24, 3, "many", torch.float32)
    y_big = torch.zeros(7, 40)
    y_big[:, 8:32] = y
    h_big = torch.zeros(7, 30)
    h_big[:, 3:27] = h
    out = y_big.clone()
    deu_add(out[:, 8:32], h_big[:, 3:27], make_bank(params), torch.tensor(slots))
    assert torch.equal(out[:, :8], y_big[:, :8]) and torch.equal(out[:, 32:], y_big[:, 32:])
    assert_op_close(out[:, 8:32], *op_expected(y, h, params, slots), slots)


def test_empty_shapes_are_noops() -> None:
    deu_add(
        torch.zeros(0, 8),
        torch.zeros(0, 8),
        torch.zeros(N_PLANES, 2, 8),
        torch.zeros(0, dtype=torch.long),
    )
    y = torch.ones(3, 8)
    deu_add(y, y.clone(), torch.zeros(N_PLANES, 0, 8), torch.full((3,), -1))
    assert torch.equal(y, torch.ones(3, 8))


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", [{"block_t": 3}, {"block_t": 0}, {"block_f": 6}])
def test_launcher_checks_only_its_block_sizes(blocks: dict[str, int]) -> None:
    """deu_add trusts deu_apply's one check per call (check_deu_args and the SlotMeta builders,
    whose cases are in test_deu.py and test_per_token_meta.py); only the block sizes, which
    deu_apply never passes, are its own."""
    y, h, params, slots = make_op_case(4, 6, 3, "many", torch.float32)
    out = y.clone()
    with pytest.raises(ValueError, match=next(iter(blocks))):
        deu_add(out, h, make_bank(params), torch.tensor(slots), **blocks)
    assert torch.equal(out, y)


# --- real GPU (compiled kernel) ------------------------------------------------------------

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# On CUDA tl.exp is ex2.approx(x * log2 e): ~2 ulp plus the product's rounding, up to ~23 ulp of
# e^(+-32); sin / cos are libdevice's. 4x the CPU units covers it.
GPU_UNITS = 256.0


def _check_gpu(T: int, F: int, S: int, pattern: str, dtype: torch.dtype) -> None:
    y, h, params, slots = make_op_case(T, F, S, pattern, dtype, seed=T)
    bank = make_bank(params).cuda()
    out = y.cuda()
    deu_apply(out, h.cuda(), bank, build_slot_meta(slots, "cuda"))  # dispatches to deu_add
    torch.cuda.synchronize()
    assert_op_close(out.cpu(), *op_expected(y, h, params, slots, units=GPU_UNITS), slots)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["none", "interleaved", "one_slot", "many", "runs", "distinct"])
@pytest.mark.parametrize("T", [1, 32, 300])
def test_gpu_patterns(T: int, pattern: str, dtype: torch.dtype) -> None:
    S = max(T, 8) if pattern == "distinct" else 8
    _check_gpu(T, 3072, S, pattern, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("F", [7, 130, 3072, 4096])
def test_gpu_shapes(F: int, dtype: torch.dtype) -> None:
    _check_gpu(45, F, 4, "many", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_tiny_r_and_zero_gain(dtype: torch.dtype) -> None:
    h, _, bank, slots, want, tol = tiny_r_case(dtype, F=256, T=16)
    cuda_slots = torch.tensor(slots, device="cuda")
    out = torch.zeros_like(h).cuda()
    deu_add(out, h.cuda(), bank.cuda(), cuda_slots)
    assert ((out.cpu().double() - want).abs() <= tol * (GPU_UNITS / 64)).all()
    bank[8] = 0.0  # gain
    out = torch.zeros_like(h).cuda()
    deu_add(out, h.cuda(), bank.cuda(), cuda_slots)
    assert not out.any()


@pytest.mark.gpu
def test_gpu_int64_row_offsets() -> None:
    """Tokens past element 2**31: int32 row offsets would wrap and write out of bounds."""
    F = 3072
    T = (1 << 31) // F + 64
    y = torch.zeros(T, F, dtype=torch.float16, device="cuda")  # (T, F) ~4.3 GB
    h = torch.zeros(T, F, dtype=torch.float16, device="cuda")
    ty, th, params, tail = make_op_case(16, F, 2, "many", torch.float16)
    y[-16:] = ty.cuda()
    h[-16:] = th.cuda()
    slots = [-1] * (T - 16) + tail
    deu_apply(y, h, make_bank(params).cuda(), build_slot_meta(slots, "cuda"))
    torch.cuda.synchronize()
    assert_op_close(y[-16:].cpu(), *op_expected(ty, th, params, tail, units=GPU_UNITS), tail)
    assert not y[: T - 16].any()
