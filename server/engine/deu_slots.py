"""Preallocated DEU planes: every resident adapter owns one slot of one bank per layer."""

from __future__ import annotations

import torch
from torch import Tensor

from hotlora.adapters.deu_format import DEUAdapter
from hotlora.kernels.deu import deu_planes
from hotlora.kernels.deu_params import N_PLANES
from hotlora.server.engine.models import ModelSpec


class DEUSlots:
    """bank[layer] (N_PLANES, S, d_ff) float32, the evaluation planes of kernels/deu.py.

    A slot's layers that its adapter does not cover keep all-zero planes, whose gain 0 adds
    exactly nothing; the planes are computed once here, never per step.
    """

    def __init__(self, cfg: ModelSpec, max_slots: int, device: torch.device) -> None:
        self.bank = torch.zeros(
            cfg.n_layer, N_PLANES, max_slots, cfg.d_ff, device=device
        )  # (L, P, S, d_ff)

    def write(self, slot: int, adapter: DEUAdapter) -> None:
        self.clear(slot)
        for layer in adapter.config.layers:
            planes = deu_planes(adapter.neuron_params(layer))  # (P, d_ff)
            self.bank[layer, :, slot].copy_(planes)

    def clear(self, slot: int) -> None:
        self.bank[:, :, slot] = 0

    def layer(self, layer: int) -> Tensor:
        return self.bank[layer]  # (P, S, d_ff), contiguous
