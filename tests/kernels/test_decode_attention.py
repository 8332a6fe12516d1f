"""Decode attention (Triton kernel and torch path) vs the fp64 reference.

Without a GPU the Triton kernel runs under TRITON_INTERPRET=1 (set in tests/conftest.py) on CPU
tensors, in fp32/fp16 only (bf16 is broken in the interpreter) and on tiny shapes; a small
block_s makes its chunk loop run several times. Tests marked ``gpu`` run the public op on CUDA,
including inside a captured CUDA graph, and skip without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from hotlora.kernels.attention import decode_attention
from hotlora.kernels.reference import decode_attention_reference
from hotlora.kernels.triton_attention import triton_decode_attention

INTERP_DTYPES = (torch.float32, torch.float16)
TORCH_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# dtype -> (rtol, atol) against the fp64 reference on the dtype-rounded inputs. Outputs are
# convex mixes of randn values, O(1), so the half tolerances are ~2 ulps of the final rounding.
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# (H, H_kv): MHA, GQA with G = 3 and 2 (non-power-of-two and power-of-two), MQA.
HEADS = [(2, 2), (6, 2), (6, 3), (4, 1)]
S, N_ROWS = 40, 5
ROWS = [3, 0, 2, 4]  # permuted, N_ROWS > B
LENGTHS = [1, S, 37, 17]  # 1, S, and two that are no multiple of block_s = 16


@dataclass
class Case:
    q: Tensor  # (B, H, D)
    k_cache: Tensor  # (N_rows, H_kv, S, D)
    v_cache: Tensor  # (N_rows, H_kv, S, D)
    rows: Tensor  # (B,) int64
    lengths: Tensor  # (B,) int64
    scale: float

    def args(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, float]:
        return self.q, self.k_cache, self.v_cache, self.rows, self.lengths, self.scale

    def reference(self) -> Tensor:
        return decode_attention_reference(*self.args())


def make_case(
    H: int, H_kv: int, D: int, dtype: torch.dtype, layout: str = "contiguous", B: int = 4
) -> Case:
    """layout: "contiguous"; "strided": caches are cache[layer, :, :, :S] of a
    (n_layer, N_rows, H_kv, S + 8, D) stack and q a transposed (H, B, D) tensor;
    "seq_major": caches stored (N_rows, S, H_kv, D)."""
    g = torch.Generator().manual_seed(1000 * H + 10 * H_kv + D)
    shape = (N_ROWS, H_kv, S, D)
    if layout == "strided":
        q = torch.randn(H, B, D, generator=g).to(dtype).transpose(0, 1)  # (B, H, D) view
        # Layer 1 of a stack preallocated for S + 8 positions: offset storage, padded strides.
        k = torch.randn(2, N_ROWS, H_kv, S + 8, D, generator=g).to(dtype)[1, :, :, :S]
        v = torch.randn(2, N_ROWS, H_kv, S + 8, D, generator=g).to(dtype)[1, :, :, :S]
    elif layout == "seq_major":
        q = torch.randn(B, H, D, generator=g).to(dtype)
        k = torch.randn(N_ROWS, S, H_kv, D, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(N_ROWS, S, H_kv, D, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, H, D, generator=g).to(dtype)
        k = torch.randn(*shape, generator=g).to(dtype)
        v = torch.randn(*shape, generator=g).to(dtype)
    rows = torch.tensor(ROWS[:B], dtype=torch.long)
    lengths = torch.tensor(LENGTHS[:B], dtype=torch.long)
    return Case(q, k, v, rows, lengths, D**-0.5)


def assert_matches(out: Tensor, case: Case, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == case.q.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), case.reference().cpu(), rtol=rtol, atol=atol)


# --- Triton kernel under the interpreter ---------------------------------------------------


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("H,H_kv", HEADS)
@pytest.mark.parametrize("D", [16, 24])
def test_triton_heads_and_dims(H: int, H_kv: int, D: int, dtype: torch.dtype) -> None:
    case = make_case(H, H_kv, D, dtype)
    assert_matches(triton_decode_attention(*case.args(), block_s=16), case, dtype)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["strided", "seq_major"])
def test_triton_strided_views(layout: str, dtype: torch.dtype) -> None:
    case = make_case(6, 2, 24, dtype, layout=layout)
    assert not case.k_cache.is_contiguous() and not case.v_cache.is_contiguous()
    assert case.q.is_contiguous() == (layout == "seq_major")
    assert (case.k_cache.storage_offset() > 0) == (layout == "strided")
    assert_matches(triton_decode_attention(*case.args(), block_s=16), case, dtype)


@pytest.mark.parametrize("block_s", [None, 1, 8, 64])
def test_triton_block_sizes(block_s: int | None) -> None:
    """Default block, one position per chunk, and one chunk covering the whole cache."""
    case = make_case(6, 3, 8, torch.float32, B=3)
    assert_matches(triton_decode_attention(*case.args(), block_s=block_s), case, torch.float32)


# --- torch path (CPU) ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("H,H_kv", HEADS)
@pytest.mark.parametrize("D", [16, 24])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "seq_major"])
def test_torch_path(layout: str, H: int, H_kv: int, D: int, dtype: torch.dtype) -> None:
    case = make_case(H, H_kv, D, dtype, layout=layout)
    assert_matches(decode_attention(*case.args()), case, dtype)


# --- both paths ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("H,H_kv", [(6, 2), (4, 1)])
def test_triton_and_torch_agree(H: int, H_kv: int, dtype: torch.dtype) -> None:
    case = make_case(H, H_kv, 24, dtype, layout="strided")
    tri = triton_decode_attention(*case.args(), block_s=16)
    ref = decode_attention(*case.args())
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(tri.double(), ref.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_zero_and_out_of_range_lengths(path: str) -> None:
    """Length 0 (and negative) gives zeros; lengths past S are clamped to S, never read beyond."""
    case = make_case(6, 2, 16, torch.float32)
    case.lengths = torch.tensor([0, S + 25, -3, 5])
    # Poison the cache beyond each row so an out-of-bounds read would show up as NaN.
    big_k = torch.full((N_ROWS, 2, 2 * S, 16), float("nan"))
    big_v = big_k.clone()
    big_k[:, :, :S], big_v[:, :, :S] = case.k_cache, case.v_cache
    case.k_cache, case.v_cache = big_k[:, :, :S], big_v[:, :, :S]
    if path == "triton":
        out = triton_decode_attention(*case.args(), block_s=16)
    else:
        out = decode_attention(*case.args())
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    clamped = Case(*case.args()[:4], torch.tensor([0, S, 0, 5]), case.scale)
    assert_matches(out, clamped, torch.float32)


def test_validation() -> None:
    case = make_case(6, 2, 16, torch.float32)
    q, k, v, rows, lengths, scale = case.args()
    bad: list[tuple[type[Exception], tuple[Any, ...], str]] = [
        (TypeError, (q.numpy(), k, v, rows, lengths, scale), "must be a torch.Tensor"),
        (TypeError, (q, k, v, rows, lengths, torch.tensor(scale)), "scale"),
        (ValueError, (q[0], k, v, rows, lengths, scale), "expected q"),
        (ValueError, (q, k[0], v, rows, lengths, scale), "expected q"),
        (ValueError, (q, k, v, rows[:3], lengths, scale), "length B=4"),
        (ValueError, (q, k, v, rows, lengths[:, None], scale), "length B=4"),
        (ValueError, (q, k, v[:, :, :20], rows, lengths, scale), "differ in shape"),
        (ValueError, (q[:, :, :8], k, v, rows, lengths, scale), "head dim"),
        (ValueError, (q[:, :5], k, v, rows, lengths, scale), "multiple of the kv heads"),
        (TypeError, (q, k.half(), v, rows, lengths, scale), "one floating dtype"),
        (TypeError, (q.int(), k.int(), v.int(), rows, lengths, scale), "one floating dtype"),
        (TypeError, (q, k, v, rows.int(), lengths, scale), "int64"),
        (TypeError, (q, k, v, rows, lengths.int(), scale), "int64"),
        (ValueError, (q, k, v, rows.repeat(2)[::2], lengths, scale), "must be contiguous"),
        (
            ValueError,
            (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, rows, lengths, scale),
            "contiguous last dim",
        ),
    ]
    # decode_attention checks once per call; the Triton launcher trusts it and checks only
    # block_s, which decode_attention never passes.
    for exc, args, msg in bad:
        with pytest.raises(exc, match=msg):
            decode_attention(*args)
    for block_s in (24, 0):
        with pytest.raises(ValueError, match="block_s"):
            triton_decode_attention(*case.args(), block_s=block_s)


# --- real GPU ------------------------------------------------------------------------------


def _cuda(case: Case) -> Case:
    q, k, v, rows, lengths, scale = case.args()
    return Case(q.cuda(), k.cuda(), v.cuda(), rows.cuda(), lengths.cuda(), scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("H,H_kv,D", [(12, 12, 64), (32, 8, 128), (9, 3, 64), (8, 1, 80)])
def test_gpu_decode_attention(H: int, H_kv: int, D: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    B, n_rows, s = 8, 11, 1024
    case = Case(
        torch.randn(B, H, D, generator=g).to(dtype),
        torch.randn(n_rows, H_kv, s, D, generator=g).to(dtype),
        torch.randn(n_rows, H_kv, s, D, generator=g).to(dtype),
        torch.randperm(n_rows, generator=g)[:B],
        torch.tensor([1, 2, 63, 64, 65, 700, 1023, 1024]),
        D**-0.5,
    )
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the op raises
    try:
        out = decode_attention(*_cuda(case).args())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_matches(out, case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_cuda_graph_replay(dtype: torch.dtype) -> None:
    """Capture once at short lengths, then replay with new q, rows and longer lengths."""
    g = torch.Generator().manual_seed(1)
    B, H, H_kv, D, n_rows, s = 4, 8, 2, 64, 6, 256
    k = torch.randn(n_rows, H_kv, s, D, generator=g).to(dtype).cuda()
    v = torch.randn(n_rows, H_kv, s, D, generator=g).to(dtype).cuda()
    q = torch.randn(B, H, D, generator=g).to(dtype).cuda()
    rows = torch.tensor([0, 1, 2, 3], device="cuda")
    lengths = torch.tensor([1, 2, 3, 4], device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles the kernel outside the capture
        decode_attention(q, k, v, rows, lengths, D**-0.5)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, rows, lengths, D**-0.5)
    for new_rows, new_lengths in (
        ([5, 3, 0, 2], [256, 17, 130, 1]),
        ([1, 1, 4, 0], [0, 99, 5, 200]),
    ):
        q.copy_(torch.randn(B, H, D, generator=g).to(dtype))
        rows.copy_(torch.tensor(new_rows))
        lengths.copy_(torch.tensor(new_lengths))
        graph.replay()
        torch.cuda.synchronize()
        case = Case(q.cpu(), k.cpu(), v.cpu(), rows.cpu(), lengths.cpu(), D**-0.5)
        assert_matches(out.cpu(), case, dtype)
