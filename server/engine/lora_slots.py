"""Stacked, preallocated LoRA weights: every resident adapter owns one slot of every buffer."""

from __future__ import annotations

import torch
from torch import Tensor

from hotlora.adapters.format import LoRAAdapter
from hotlora.server.engine.models import ModelSpec


class LoRASlots:
    """A (S, R, d_in) and B (S, d_out, R) per layer and target, zero-padded to rank R.

    A slot holding no module for some (layer, target) keeps zeros and scale 0 there, so the
    batched op needs no per-module special case. They are held in the model's dtype: a
    half-precision engine's adapter reads (the whole cost of a many-adapter decode step on the
    CPU) are then half the bytes; float32 slots made a bf16 CPU step read twice as much.
    """

    def __init__(
        self,
        cfg: ModelSpec,
        max_slots: int,
        max_rank: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.max_slots, self.max_rank = max_slots, max_rank
        dims = cfg.target_dims()
        self.targets = tuple(dims)  # the layout's order: the hook's target index
        # Row widths of the stored weights (every d_in, and R): the step's gather indices.
        self.row_widths = tuple(sorted({d_in for d_in, _ in dims.values()} | {max_rank}))
        self.A: list[list[Tensor]] = []
        self.B: list[list[Tensor]] = []
        # Stored rank-minor and used through transposed views: the CPU path's many-slot decode
        # then reads each slot's weights in place instead of copying them (bench_kernels.py).
        for _ in range(cfg.n_layer):
            self.A.append(
                [
                    torch.zeros(max_slots, dims[t][0], max_rank, device=device, dtype=dtype).mT
                    for t in self.targets
                ]
            )  # (S, R, d_in) views
            self.B.append(
                [
                    torch.zeros(max_slots, max_rank, dims[t][1], device=device, dtype=dtype).mT
                    for t in self.targets
                ]
            )  # (S, d_out, R) views
        # Scales stay fp32 whatever the model dtype; the negated copy serves merged batches.
        n_targets = len(self.targets)
        self.scales = torch.zeros(cfg.n_layer, n_targets, max_slots, device=device)  # (L, T, S)
        self.neg_scales = torch.zeros_like(self.scales)

    def write(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy an adapter into a slot, overwriting everything an earlier occupant left there.

        Each byte of the slot is written once: a module's rank-r block is copied and only the
        rank padding beyond it, and the (layer, target)s the adapter does not adapt, are zeroed.
        """
        index = {t: i for i, t in enumerate(self.targets)}
        scales = torch.zeros(len(self.A), len(self.targets))  # (L, T), on the CPU
        covered = set()
        for m in adapter.modules:
            t, r = index[m.target], m.rank
            a, b = self.A[m.layer][t][slot], self.B[m.layer][t][slot]  # (R, d_in), (d_out, R)
            a[:r].copy_(m.A)
            b[:, :r].copy_(m.B)
            if r < self.max_rank:
                a[r:].zero_()
                b[:, r:].zero_()
            scales[m.layer, t] = m.scaling
            covered.add((m.layer, t))
        for layer, (layer_a, layer_b) in enumerate(zip(self.A, self.B, strict=True)):
            for t, (a, b) in enumerate(zip(layer_a, layer_b, strict=True)):
                if (layer, t) not in covered:
                    a[slot].zero_()
                    b[slot].zero_()
        self.scales[:, :, slot] = scales.to(self.scales.device)
        torch.neg(self.scales, out=self.neg_scales)

    def clear(self, slot: int) -> None:
        """Retire a slot: its scales become 0, so it adds exactly nothing wherever it is read.

        Its A and B keep their (finite, validated) values: nothing reads a free slot, and
        `write` overwrites every byte of it before it serves again, so zeroing them here would
        only double the memory traffic of an eviction.
        """
        self.scales[:, :, slot] = 0
        self.neg_scales[:, :, slot] = 0

    def delta(self, layer: int, target: int, slot: int) -> Tensor:
        """s * B @ A of one slot in fp32: the dense update merging adds to W.T."""
        a = self.A[layer][target][slot].float()  # (R, d_in)
        b = self.B[layer][target][slot].float()  # (d_out, R)
        return self.scales[layer, target, slot] * (b @ a)  # (d_out, d_in)
