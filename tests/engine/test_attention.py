"""The cached-attention pieces both families share: `attend` against an fp64 reference, the
flat-index KV-cache write against a per-token loop, and the step's bias and index."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from hotlora.server.engine.batch import StepBatch, build_step
from hotlora.server.engine.errors import EngineError
from hotlora.server.engine.kv_cache import KVCache
from hotlora.server.engine.models.base import attend, cached_kv

# Largest |attend - fp64 reference| per dtype (outputs are averages of N(0, 1) values).
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor,
              scale: float) -> torch.Tensor:
    """softmax(q k^T scale, masked out) v in float64, KV heads repeated for their query heads."""
    G = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(G, dim=1)  # (B, H, S, D)
    v64 = v.double().repeat_interleave(G, dim=1)
    scores = (q.double() @ k64.transpose(2, 3)) * scale  # (B, H, L, S)
    return torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1) @ v64


def _case(
    B: int, H: int, H_kv: int, L: int, S: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    D = 16
    # The cache is longer than S: attend reads a strided view, as the engine does.
    k = torch.randn(B, H_kv, S + 7, D, generator=gen).to(dtype)[:, :, :S]
    v = torch.randn(B, H_kv, S + 7, D, generator=gen).to(dtype)[:, :, :S]
    q = torch.randn(B, L, H, D, generator=gen).to(dtype).transpose(1, 2)  # (B, H, L, D) view
    lengths = torch.randint(L, S + 1, (B,), generator=gen)  # each row's cached extent
    positions = lengths[:, None] - L + torch.arange(L)  # (B, L)
    masked = torch.arange(S) > positions[:, None, :, None]  # (B, 1, L, S)
    bias = torch.zeros(masked.shape, dtype=dtype).masked_fill_(masked, float("-inf"))
    return q, k, v, bias, masked


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("H,H_kv", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("L,S", [(1, 1), (1, 13), (5, 5), (3, 11)])
def test_attend_matches_fp64_reference(dtype: torch.dtype, H: int, H_kv: int, L: int,
                                       S: int) -> None:
    q, k, v, bias, masked = _case(5, H, H_kv, L, S, dtype)
    got = attend(q, k, v, bias, 0.25)
    assert got.shape == q.shape and got.dtype == dtype
    want = reference(q, k, v, masked, 0.25)
    assert (got.double() - want).abs().max().item() <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("L", [1, 3])
def test_attend_on_cuda_matches_fp64_reference(dtype: torch.dtype, L: int) -> None:
    q, k, v, bias, masked = _case(5, 6, 2, L, 11, dtype)
    got = attend(q.cuda(), k.cuda(), v.cuda(), bias.cuda(), 0.25).cpu()
    assert (got.double() - reference(q, k, v, masked, 0.25)).abs().max().item() <= TOL[dtype]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("L", [1, 4])
def test_each_row_of_a_batch_equals_the_row_attended_alone(dtype: torch.dtype, L: int) -> None:
    q, k, v, bias, _ = _case(6, 6, 2, L, 9, dtype, seed=3)
    batch = attend(q, k, v, bias, 0.3)
    for b in range(6):
        alone = attend(q[b : b + 1], k[b : b + 1], v[b : b + 1], bias[b : b + 1], 0.3)
        if dtype == torch.float32:
            # SDPA's CPU kernel splits its work by batch size: rows agree to rounding only
            # (measured 1.2e-7 here), as the base GEMMs do.
            torch.testing.assert_close(alone[0], batch[b], rtol=0, atol=1e-6)
        else:
            assert torch.equal(alone[0], batch[b])


def _cache(n_layer: int, n_kv_head: int, head_dim: int, max_rows: int,
           max_seq_len: int) -> KVCache:
    spec: Any = SimpleNamespace(n_layer=n_layer, n_kv_head=n_kv_head, head_dim=head_dim)
    return KVCache(spec, max_rows, max_seq_len, torch.device("cpu"), torch.bfloat16)


def _step(kv: KVCache, rows: list[int], lengths: list[int], starts: list[int]) -> StepBatch:
    tokens = [[1] * n for n in lengths]
    none = [-1] * len(rows)
    return build_step(kv, rows, tokens, starts, none, none, None, torch.device("cpu"),
                      torch.bfloat16)


def test_cached_kv_writes_each_token_where_its_row_and_position_say() -> None:
    kv = _cache(n_layer=2, n_kv_head=3, head_dim=4, max_rows=5, max_seq_len=10)
    rows, lengths, starts = [3, 0, 4], [2, 3, 1], [4, 0, 7]
    step = _step(kv, rows, lengths, starts)
    L = max(lengths)
    k = torch.randn(3, 3, L, 4).to(torch.bfloat16)  # (B, H_kv, L, D)
    v = torch.randn(3, 3, L, 4).to(torch.bfloat16)
    k_seen, v_seen = cached_kv(step.attn, 1, k, v)
    want_k, want_v = torch.zeros_like(kv.k), torch.zeros_like(kv.v)
    for b, (row, start) in enumerate(zip(rows, starts, strict=True)):
        for i in range(L):  # padding tokens are written too (later tokens overwrite them)
            want_k[1, row, :, start + i] = k[b, :, i]
            want_v[1, row, :, start + i] = v[b, :, i]
    assert torch.equal(kv.k, want_k) and torch.equal(kv.v, want_v)
    s_used = max(s + L for s in starts)
    assert step.attn.s_used == s_used
    assert torch.equal(k_seen, kv.k[1, rows, :, :s_used])
    assert torch.equal(v_seen, kv.v[1, rows, :, :s_used])


def test_step_bias_lets_each_query_see_exactly_the_positions_up_to_its_own() -> None:
    kv = _cache(n_layer=1, n_kv_head=1, head_dim=2, max_rows=2, max_seq_len=8)
    step = _step(kv, [1, 0], [3, 1], [2, 5])
    bias = step.attn.bias  # (B, 1, L, S_used)
    # Row 1's padding positions 6 and 7 widen the step's extent to 8.
    assert bias.dtype == torch.bfloat16 and bias.shape == (2, 1, 3, 8)
    for b, start in enumerate([2, 5]):
        for i in range(3):
            seen = [s for s in range(8) if bias[b, 0, i, s] == 0]
            assert seen == list(range(start + i + 1))
            assert all(bias[b, 0, i, s] == float("-inf") for s in range(start + i + 1, 8))


def test_a_step_past_the_cache_is_refused_before_anything_is_written() -> None:
    kv = _cache(n_layer=1, n_kv_head=2, head_dim=2, max_rows=2, max_seq_len=8)
    with pytest.raises(EngineError, match="past the KV cache"):
        _step(kv, [0, 1], [2, 1], [3, 7])  # row 0 reaches position 4, row 1 position 8
