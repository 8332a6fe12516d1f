"""Per-step batch metadata: built once on the host, then shared by every layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hotlora.kernels import SlotMeta, build_slot_meta
from hotlora.server.engine.errors import EngineError
from hotlora.server.engine.kv_cache import KVCache
from hotlora.server.engine.models import AttnBatch


@dataclass(frozen=True)
class StepBatch:
    """The tensors of one forward pass over B rows of L query tokens each."""

    input_ids: Tensor  # (B, L)
    positions: Tensor  # (B, L)
    last: Tensor  # (B,) index along L of each row's last real token
    attn: AttnBatch
    lora: SlotMeta
    lora_minus: SlotMeta | None  # rows that must subtract the merged adapter's delta
    deu: SlotMeta  # token -> DEU slot (-1 = the frozen GELU)

    @property
    def has_adapters(self) -> bool:
        return not (self.lora.empty and self.lora_minus is None and self.deu.empty)


def _row_range(rows: list[int]) -> tuple[int, int] | None:
    lo = rows[0]
    return (lo, lo + len(rows)) if rows == list(range(lo, lo + len(rows))) else None


def lora_rows(slots: list[int], merged_slot: int | None) -> tuple[list[int], list[int] | None]:
    """Each row's LoRA slot to add, and (with a merged adapter) the merged slot to subtract:
    the merged adapter's own rows do neither, every other row subtracts it."""
    if merged_slot is None:
        return slots, None
    plus = [-1 if s == merged_slot else s for s in slots]
    return plus, [-1 if s == merged_slot else merged_slot for s in slots]


def build_step(
    kv: KVCache,
    rows: list[int],
    tokens: list[list[int]],
    starts: list[int],
    slots: list[int],
    deu_slots: list[int],
    merged_slot: int | None,
    device: torch.device,
    dtype: torch.dtype,
    row_widths: Sequence[int] = (),
) -> StepBatch:
    """Rows `rows` feed `tokens[b]` at positions starts[b], starts[b]+1, ... (right-padded).

    slots[b] is row b's LoRA slot and deu_slots[b] its DEU slot (-1 = none). With
    `merged_slot` set, that LoRA is in the weights: its rows take no delta and every other row
    subtracts it. `dtype`: the model's, the attention bias's. `row_widths`: the LoRA weights'
    row widths (LoRASlots.row_widths).
    """
    L = max(len(t) for t in tokens)
    # One tensor from one padded list: a copy per row costs ~5 ops each, every step.
    ids = torch.tensor([[*t, *[0] * (L - len(t))] for t in tokens], dtype=torch.long)  # (B, L)
    start = torch.tensor(starts, dtype=torch.long)  # (B,)
    positions = start[:, None] + torch.arange(L)  # (B, L)
    s_used = int(positions.max()) + 1
    masked = torch.arange(s_used) > positions[:, None, :, None]  # (B, 1, L, S_used)
    bias = torch.zeros(masked.shape, dtype=dtype).masked_fill_(masked, float("-inf"))
    _, H_kv, S, _ = kv.k.shape[1:]
    if s_used > S:  # the flat index below would write into the next head's or row's cache
        raise EngineError(f"positions reach {s_used - 1}, past the KV cache's {S}")
    row_t = torch.tensor(rows, dtype=torch.long)  # (B,)
    kv_index = (row_t[:, None, None] * H_kv + torch.arange(H_kv)) * S + positions[:, :, None]
    lengths = [len(t) for t in tokens]

    def per_token(row_slots: list[int]) -> list[int]:
        """Each row's slot for each of its real tokens, -1 for its padding, flattened (B * L)."""
        return [
            k if i < n else -1 for k, n in zip(row_slots, lengths, strict=True) for i in range(L)
        ]

    plus_rows, minus_rows = lora_rows(slots, merged_slot)
    plus = per_token(plus_rows)
    minus = None
    if minus_rows is not None:
        minus = build_slot_meta(per_token(minus_rows), device, row_widths)
    attn = AttnBatch(
        k_cache=kv.k,
        v_cache=kv.v,
        rows=row_t.to(device),
        row_range=_row_range(rows),
        positions=positions.to(device),
        kv_index=kv_index.to(device),  # (B, L, H_kv)
        bias=bias.to(device),
        s_used=s_used,
    )
    return StepBatch(
        input_ids=ids.to(device),
        positions=positions.to(device),
        last=torch.tensor([n - 1 for n in lengths], device=device),
        attn=attn,
        lora=build_slot_meta(plus, device, row_widths),
        lora_minus=minus,
        deu=build_slot_meta(per_token(deu_slots), device),
    )
