"""The model's adapter hook for one step: one batched op per adapted projection or activation."""

from __future__ import annotations

from torch import Tensor

from hotlora.kernels import SlotMeta, lora_apply
from hotlora.kernels.deu import deu_apply
from hotlora.server.engine.deu_slots import DEUSlots
from hotlora.server.engine.lora_slots import LoRASlots


class BatchAdapters:
    """LoRA deltas by `lora` slot, DEU deltas by `deu` slot, both metas built once per step.

    With a merged adapter h in the weights, `minus` names, for every row not of h, the slot of h,
    so those rows get delta_j - delta_h (dLoRA's correction) and rows of h pay nothing.
    """

    def __init__(
        self,
        slots: LoRASlots,
        deu_slots: DEUSlots,
        lora: SlotMeta,
        minus: SlotMeta | None,
        deu: SlotMeta,
    ) -> None:
        self.slots, self.deu_slots = slots, deu_slots
        self.meta, self.minus, self.deu = lora, minus, deu
        self.plus = not lora.empty
        self.any_lora = self.plus or minus is not None

    def lora(self, layer: int, target: int, x: Tensor, y: Tensor) -> Tensor:
        if not self.any_lora:
            return y
        A, B = self.slots.A[layer][target], self.slots.B[layer][target]
        if self.plus:
            lora_apply(y, x, A, B, self.slots.scales[layer, target], self.meta)
        if self.minus is not None:
            lora_apply(y, x, A, B, self.slots.neg_scales[layer, target], self.minus)
        return y

    def activation(self, layer: int, h: Tensor, y: Tensor) -> Tensor:
        if self.deu.empty:
            return y
        deu_apply(y, h, self.deu_slots.layer(layer), self.deu)
        return y
