"""per_token_meta: the device-only metadata a CUDA graph's decode step builds from static slots.

The LoRA op with it must match the fp64 reference on the torch path (every dtype) and the
Triton SGMV kernels (under the interpreter without a GPU), leave rows without an adapter
bit-exact, and give each row the bits the gathered plan gives it; the DEU op likewise.
"""

from __future__ import annotations

import pytest
import torch

from hotlora.kernels import build_slot_meta, deu_apply, lora_apply
from hotlora.kernels.slot_meta import SlotMeta, per_token_meta
from hotlora.kernels.triton_lora import sgmv_expand, sgmv_shrink
from tests.kernels.lora_cases import PATTERNS, assert_matches, make_case, with_storage
from tests.kernels.test_deu import assert_op_close, make_bank, make_op_case, op_expected

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERP_DTYPES = (torch.float32, torch.float16)  # bf16 is broken in the interpreter


def _meta(slots: list[int], S: int) -> SlotMeta:
    return per_token_meta(torch.tensor(slots, dtype=torch.long), S)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("storage", ["standard", "transposed"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_torch_path_matches_reference(pattern: str, storage: str, dtype: torch.dtype) -> None:
    S = 9 if pattern == "distinct" else 5  # distinct: a slot per token
    case = with_storage(make_case(9, 40, 24, 8, S, pattern, dtype, seed=2), storage)
    meta = per_token_meta(torch.tensor(case.slots, dtype=torch.long), S)
    assert not meta.empty and meta.num_active == meta.num_tiles == 9
    y = case.y.clone()
    lora_apply(y, case.x, case.A, case.B, case.scales, meta)
    assert_matches(y, case, dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_each_row_has_the_gathered_plans_bits(dtype: torch.dtype) -> None:
    case = with_storage(make_case(12, 40, 24, 8, 6, "many", dtype, seed=3), "transposed")
    got, want = case.y.clone(), case.y.clone()
    lora_apply(got, case.x, case.A, case.B, case.scales, _meta(case.slots, 6))
    gathered = build_slot_meta(case.slots, "cpu").with_cpu_plan("gathered")
    lora_apply(want, case.x, case.A, case.B, case.scales, gathered)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_triton_sgmv_with_one_tile_per_token(pattern: str, dtype: torch.dtype) -> None:
    S = 7 if pattern == "distinct" else 5
    case = make_case(7, 40, 72, 8, S, pattern, dtype, seed=4)
    meta = per_token_meta(torch.tensor(case.slots, dtype=torch.long), S)
    y = case.y.clone()
    sgmv_expand(y, sgmv_shrink(case.x, case.A, meta), case.B, case.scales, meta)
    assert_matches(y, case, dtype)


def test_the_host_knows_only_bounds() -> None:
    slots = torch.tensor([2, -1, 0], dtype=torch.long)
    meta = per_token_meta(slots, 4)
    assert meta.per_token and not meta.empty and not meta.all_active
    assert meta.max_slot == 3 and meta.num_tokens == 3
    assert meta.tile_slots.tolist() == [2, 0, 0]  # a token without an adapter reads slot 0...
    assert (meta.tile_ends - meta.tile_starts).tolist() == [1, 0, 1]  # ...in an empty tile
    case = make_case(3, 8, 8, 4, 2, "none", torch.float32)
    with pytest.raises(ValueError, match="out of range"):  # S=2 slots, bound 3
        lora_apply(case.y, case.x, case.A, case.B, case.scales, meta)
    with pytest.raises(TypeError, match="int64"):
        per_token_meta(slots.int(), 4)
    with pytest.raises(TypeError, match="int64"):
        per_token_meta(slots[None], 4)
    with pytest.raises(ValueError, match="contiguous"):  # the DEU kernel reads them unstrided
        per_token_meta(torch.zeros(8, dtype=torch.long)[::2], 4)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_deu_torch_path_matches_reference(pattern: str, dtype: torch.dtype) -> None:
    S = 40 if pattern == "distinct" else 5
    y, h, params, slots = make_op_case(40, 24, S, pattern, dtype, seed=5)  # 40: two row chunks
    out = y.clone()
    deu_apply(out, h, make_bank(params), per_token_meta(torch.tensor(slots), S))
    assert_op_close(out, *op_expected(y, h, params, slots), slots)
    want = y.clone()
    deu_apply(want, h, make_bank(params), build_slot_meta(slots, "cpu"))
    assert torch.equal(out, want)
