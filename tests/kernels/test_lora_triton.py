"""Triton SGMV launchers vs the fp64 reference.

Without a GPU these run under TRITON_INTERPRET=1 (set in tests/conftest.py) on CPU tensors; the
interpreter costs milliseconds per program, so shapes stay small and big shapes use big blocks.
Tests marked ``gpu`` compile the kernels for real (bf16, large offsets) and skip without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from hotlora.kernels import build_slot_meta, lora_apply
from hotlora.kernels.triton_lora import sgmv_expand, sgmv_shrink
from tests.kernels.lora_cases import PATTERNS, Case, assert_matches, make_case, with_storage

INTERP_DTYPES = (torch.float32, torch.float16)  # bf16 is broken in the interpreter


def _run(case: Case, dtype: torch.dtype, block: int | None = None) -> None:
    meta = build_slot_meta(case.slots, case.x.device)
    y = case.y.clone()
    buf = sgmv_shrink(case.x, case.A, meta, block_k=block)  # (N, R)
    sgmv_expand(y, buf, case.B, case.scales, meta, block_n=block)
    assert_matches(y, case, dtype)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("R", [1, 4, 8, 16, 48, 64, 80])  # 80: two rank blocks
def test_ranks(R: int, dtype: torch.dtype) -> None:
    # Default (GPU) blocks on an odd shape: partial K and N blocks exercise every mask.
    _run(make_case(T=9, d_in=40, d_out=72, R=R, S=5, pattern="many", dtype=dtype), dtype)


# GPT-2-small targets, then Llama-family GQA ones (SmolLM-135M k/v and down, Llama-3-8B k/v).
@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize(
    "d_in,d_out",
    [(768, 2304), (768, 3072), (3072, 768), (40, 72), (576, 192), (1536, 576), (4096, 1024)],
)
@pytest.mark.parametrize("T", [1, 6])
def test_shapes(d_in: int, d_out: int, T: int, dtype: torch.dtype) -> None:
    case = make_case(T=T, d_in=d_in, d_out=d_out, R=16, S=4, pattern="many", dtype=dtype)
    _run(case, dtype, block=256)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p != "none"])
@pytest.mark.parametrize("T", [1, 5, 70])
def test_patterns(pattern: str, T: int, dtype: torch.dtype) -> None:
    S = max(T, 6) if pattern == "distinct" else 6
    case = make_case(T=T, d_in=40, d_out=72, R=8, S=S, pattern=pattern, dtype=dtype)
    _run(case, dtype, block=128)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["interleaved", "runs"])
def test_transposed_storage(pattern: str, dtype: torch.dtype) -> None:
    """A/B stored as (S, d_in, R) / (S, R, d_out): the kernels must follow the strides."""
    case = make_case(T=12, d_in=40, d_out=72, R=8, S=5, pattern=pattern, dtype=dtype)
    _run(with_storage(case, "transposed"), dtype)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_segment_longer_than_tile(dtype: torch.dtype) -> None:
    """150 tokens of one slot plus a short one: several tiles per segment, a partial last tile."""
    case = make_case(T=150, d_in=40, d_out=72, R=8, S=3, pattern="one_slot", dtype=dtype)
    case.slots[7] = 0
    case.slots[100] = -1
    meta = build_slot_meta(case.slots, "cpu")
    assert meta.block_m == 64 and meta.num_tiles == 4
    _run(case, dtype, block=128)


def test_shrink_buffer_is_sorted_order() -> None:
    case = make_case(T=7, d_in=40, d_out=72, R=8, S=4, pattern="many", dtype=torch.float32)
    meta = build_slot_meta(case.slots, "cpu")
    buf = sgmv_shrink(case.x, case.A, meta)
    assert buf.shape == (meta.num_active, 8) and buf.dtype == torch.float32
    x64, A64 = case.x.double(), case.A.double()
    for p, t in enumerate(meta.sorted_tokens.tolist()):
        want = A64[case.slots[t]] @ x64[t]
        torch.testing.assert_close(buf[p].double(), want, rtol=1e-5, atol=1e-5)


def test_all_none_launch_is_noop() -> None:
    case = make_case(T=5, d_in=40, d_out=72, R=8, S=3, pattern="none", dtype=torch.float32)
    meta = build_slot_meta(case.slots, "cpu")
    y = case.y.clone()
    sgmv_expand(y, sgmv_shrink(case.x, case.A, meta), case.B, case.scales, meta)
    assert torch.equal(y, case.y)


def test_launchers_check_only_their_block_sizes() -> None:
    """The launchers trust lora_apply's one check per call (check_lora_args, whose cases are in
    test_lora_torch.py); only the block sizes, which lora_apply never passes, are theirs."""
    case = make_case(T=4, d_in=40, d_out=72, R=8, S=3, pattern="many", dtype=torch.float32)
    meta = build_slot_meta(case.slots, "cpu")
    for bad in (24, 8, 0):  # not a power of two, below tl.dot's 16, zero
        with pytest.raises(ValueError, match="block_k"):
            sgmv_shrink(case.x, case.A, meta, block_k=bad)
    buf = sgmv_shrink(case.x, case.A, meta)
    y = case.y.clone()
    for bad in (24, 8, 0):
        with pytest.raises(ValueError, match="block_n"):
            sgmv_expand(y, buf, case.B, case.scales, meta, block_n=bad)
    assert torch.equal(y, case.y)


# --- real GPU (compiled kernels) -----------------------------------------------------------

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda(case: Case) -> Case:
    return Case(
        y=case.y.cuda(),
        x=case.x.cuda(),
        A=case.A.cuda(),
        B=case.B.cuda(),
        scales=case.scales.cuda(),
        slots=case.slots,
    )


def _apply_cuda(case: Case) -> torch.Tensor:
    meta = build_slot_meta(case.slots, "cuda")
    y = case.y.clone()
    lora_apply(y, case.x, case.A, case.B, case.scales, meta)
    torch.cuda.synchronize()
    return y.cpu()


def _check_gpu(T: int, d_in: int, d_out: int, R: int, pattern: str, dtype: torch.dtype) -> None:
    S = max(T, 8) if pattern == "distinct" else 8
    case = make_case(T=T, d_in=d_in, d_out=d_out, R=R, S=S, pattern=pattern, dtype=dtype)
    assert_matches(_apply_cuda(_cuda(case)), case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("R", [1, 4, 8, 16, 48, 64, 80])
def test_gpu_ranks(dtype: torch.dtype, R: int) -> None:
    _check_gpu(32, 768, 2304, R, "many", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize(
    "d_in,d_out", [(768, 2304), (768, 3072), (3072, 768), (40, 72), (576, 192), (4096, 1024),
                   (4096, 14336), (14336, 4096)],
)
@pytest.mark.parametrize("T", [1, 32, 700])
def test_gpu_shapes(dtype: torch.dtype, d_in: int, d_out: int, T: int) -> None:
    _check_gpu(T, d_in, d_out, 16, "many", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("T", [1, 32, 300])
def test_gpu_patterns(dtype: torch.dtype, pattern: str, T: int) -> None:
    _check_gpu(T, 768, 768, 16, pattern, dtype)


@pytest.mark.gpu
def test_gpu_fp64_falls_back_to_torch() -> None:
    _check_gpu(32, 768, 768, 16, "interleaved", torch.float64)


@pytest.mark.gpu
def test_gpu_int64_row_offsets() -> None:
    """Tokens past row 2**31 / d: int32 row offsets would wrap and write out of bounds."""
    T, d = (1 << 31) // 768 + 64, 768
    x = torch.zeros(T, d, dtype=torch.float16, device="cuda")  # (T, d) ~3.2 GiB
    y = torch.zeros(T, d, dtype=torch.float16, device="cuda")  # (T, d)
    tail = make_case(T=16, d_in=d, d_out=d, R=16, S=2, pattern="many", dtype=torch.float16)
    x[-16:] = tail.x.cuda()
    y[-16:] = tail.y.cuda()
    slots = [-1] * (T - 16) + tail.slots
    meta = build_slot_meta(slots, "cuda")
    lora_apply(y, x, tail.A.cuda(), tail.B.cuda(), tail.scales.cuda(), meta)
    torch.cuda.synchronize()
    assert_matches(y[-16:].cpu(), tail, torch.float16)
    assert not y[: T - 16].any()
