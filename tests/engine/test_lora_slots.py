"""LoRASlots.write writes each byte of a slot once and leaves exactly what zeroing the slot and
copying the adapter in would; clear retires a slot through its scales alone."""

from __future__ import annotations

import torch

from hotlora.adapters.format import LoRAAdapter, LoRAModule
from hotlora.adapters.lora_config import LoRAConfig
from hotlora.server.engine.lora_slots import LoRASlots
from hotlora.server.engine.models.gpt2 import GPT2Config

CFG = GPT2Config.from_dict(
    {"vocab_size": 50, "n_positions": 32, "n_embd": 16, "n_layer": 3, "n_head": 2}
)
MAX_RANK = 4


def adapter(seed: int, rank: int, coverage: set[tuple[int, str]]) -> LoRAAdapter:
    """Random modules of `rank` on the (layer, target)s in `coverage`."""
    gen = torch.Generator().manual_seed(seed)
    config = LoRAConfig.from_dict(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank + seed,
         "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}, "t")
    dims = CFG.target_dims()
    modules = tuple(
        LoRAModule(layer, target, torch.randn(rank, dims[target][0], generator=gen),
                   torch.randn(dims[target][1], rank, generator=gen), (2 * rank + seed) / rank)
        for layer, target in sorted(coverage)
    )
    return LoRAAdapter("t", config, modules)


def state(slots: LoRASlots, slot: int) -> list[torch.Tensor]:
    out = [slots.scales[:, :, slot].clone(), slots.neg_scales[:, :, slot].clone()]
    for layer_a, layer_b in zip(slots.A, slots.B, strict=True):
        out += [a[slot].clone() for a in layer_a] + [b[slot].clone() for b in layer_b]
    return out


def equal(x: list[torch.Tensor], y: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(x, y, strict=True))


ALL = {(layer, t) for layer in range(3) for t in CFG.target_dims()}
SOME = {(0, "attn.c_attn"), (2, "mlp.c_fc")}


def test_a_reused_slot_equals_a_fresh_one() -> None:
    """Whatever occupied a slot before (full rank everywhere), the next adapter (lower rank,
    fewer modules) leaves the slot exactly as in a never-used engine."""
    fresh = LoRASlots(CFG, 2, MAX_RANK, torch.device("cpu"), torch.float32)
    used = LoRASlots(CFG, 2, MAX_RANK, torch.device("cpu"), torch.float32)
    nxt = adapter(2, rank=2, coverage=SOME)
    fresh.write(1, nxt)
    used.write(1, adapter(1, rank=MAX_RANK, coverage=ALL))
    used.clear(1)
    used.write(1, nxt)
    assert equal(state(used, 1), state(fresh, 1))
    used.write(1, adapter(3, rank=MAX_RANK, coverage=ALL))  # and without a clear between
    used.write(1, nxt)
    assert equal(state(used, 1), state(fresh, 1))
    # A neighbouring slot is never touched.
    assert equal(state(used, 0), state(LoRASlots(CFG, 2, MAX_RANK, torch.device("cpu"),
                                                 torch.float32), 0))


def test_write_places_each_module_and_pads_with_zeros() -> None:
    slots = LoRASlots(CFG, 1, MAX_RANK, torch.device("cpu"), torch.float32)
    a = adapter(5, rank=3, coverage=SOME)
    slots.write(0, a)
    targets = list(CFG.target_dims())
    for m in a.modules:
        t = targets.index(m.target)
        assert torch.equal(slots.A[m.layer][t][0, :3], m.A)
        assert torch.equal(slots.B[m.layer][t][0][:, :3], m.B)
        assert not slots.A[m.layer][t][0, 3:].any() and not slots.B[m.layer][t][0][:, 3:].any()
        assert slots.scales[m.layer, t, 0] == m.scaling
        assert slots.neg_scales[m.layer, t, 0] == -m.scaling
    assert int((slots.scales != 0).sum()) == len(SOME)


def test_clear_retires_a_slot_through_its_scales() -> None:
    slots = LoRASlots(CFG, 2, MAX_RANK, torch.device("cpu"), torch.float32)
    slots.write(0, adapter(1, rank=MAX_RANK, coverage=ALL))
    slots.write(1, adapter(2, rank=MAX_RANK, coverage=ALL))
    kept = state(slots, 1)
    slots.clear(0)
    assert not slots.scales[:, :, 0].any() and not slots.neg_scales[:, :, 0].any()
    assert equal(state(slots, 1), kept)
