"""Adapters resident on the device: slot buffers, reference counts, the merged adapter.

Bookkeeping only: the forward pass reads the slot buffers (`lora`, `deu`) and never this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from hotlora.adapters.adapter import Adapter
from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.deu_slots import DEUSlots
from hotlora.server.engine.errors import EngineError
from hotlora.server.engine.lora_slots import LoRASlots
from hotlora.server.engine.models import CausalLM

log = logging.getLogger(__name__)


@dataclass
class Resident:
    """An adapter in a device slot; `refs` counts the requests that use it."""

    name: str  # the name it is resident under (the server uses name@version)
    adapter: Adapter
    slot: int
    refs: int = 0
    removed: bool = False

    @property
    def lora_slot(self) -> int:
        return -1 if self.adapter.lora is None else self.slot

    @property
    def deu_slot(self) -> int:
        return -1 if self.adapter.deu is None else self.slot


class Residents:
    """The device slots of one engine and which adapter sits in each, least recently used first."""

    def __init__(
        self, model: CausalLM, config: EngineConfig, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.model, self.config = model, config
        self.lora = LoRASlots(model.cfg, config.max_adapters, config.max_rank, device, dtype)
        self.deu = DEUSlots(model.cfg, config.max_adapters, device)
        self._by_name: dict[str, Resident] = {}
        self._free_slots = list(range(config.max_adapters - 1, -1, -1))
        self._merged: Resident | None = None
        self._pristine: dict[tuple[int, int], torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def get(self, name: str) -> Resident:
        res = self._by_name.get(name)
        if res is None:
            raise EngineError(f"adapter {name!r} is not loaded")
        return res

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def idle(self) -> list[str]:
        """Resident adapters no request uses, least recently used first (eviction order)."""
        return [n for n, r in self._by_name.items() if r.refs == 0]

    def kinds(self) -> dict[str, str]:
        return {n: r.adapter.kind for n, r in self._by_name.items()}

    def load(self, name: str, adapter: Adapter) -> None:
        """Copy an already validated adapter into a free device slot."""
        if name in self._by_name:
            raise EngineError(f"adapter {name!r} is already loaded; remove it first")
        if adapter.rank > self.config.max_rank:
            raise EngineError(f"adapter {name!r} has rank {adapter.rank} > {self.config.max_rank}")
        if not self._free_slots:
            raise EngineError(
                f"all {self.config.max_adapters} adapter slots are in use; remove an adapter first"
            )
        slot = self._free_slots.pop()
        if adapter.lora is not None:
            self.lora.write(slot, adapter.lora)
        if adapter.deu is not None:
            self.deu.write(slot, adapter.deu)
        self._by_name[name] = Resident(name, adapter, slot)
        log.info("adapter %s: %s, rank %d, in slot %d", name, adapter.kind, adapter.rank, slot)

    def remove(self, name: str) -> None:
        """Unload an adapter; requests still using it finish on it, then its slot is freed."""
        res = self.get(name)
        del self._by_name[name]
        if self._merged is res:
            self.unmerge()
        res.removed = True
        if res.refs == 0:
            self._free(res)

    def acquire(self, res: Resident) -> None:
        """A request uses `res`: it becomes the most recently used and cannot be freed."""
        res.refs += 1
        if not res.removed:
            self._by_name[res.name] = self._by_name.pop(res.name)

    def release(self, res: Resident) -> None:
        res.refs -= 1
        if res.refs == 0 and res.removed:
            self._free(res)

    def _free(self, res: Resident) -> None:
        self.lora.clear(res.slot)
        self.deu.clear(res.slot)
        self._free_slots.append(res.slot)

    # ------------------------------------------------------------------ merged weights

    @property
    def merged(self) -> Resident | None:
        return self._merged

    @property
    def merged_slot(self) -> int | None:
        """The slot whose LoRA is in the weights, if any."""
        return None if self._merged is None else self._merged.slot

    def merge(self, name: str) -> None:
        """Serve `name`'s LoRA from W + s * B @ A; other rows get delta_j - delta_name.

        A DEU part cannot be merged (it is not linear) and keeps being applied per row.
        """
        res = self.get(name)
        lora = res.adapter.lora
        if lora is None:
            raise EngineError(f"adapter {name!r} has no LoRA part to merge into the weights")
        if self._merged is not None:
            self.unmerge()
        for m in lora.modules:
            t = self.lora.targets.index(m.target)
            mod = self.model.target(m.layer, t)
            merged = mod.merged_weight(self.lora.delta(m.layer, t, res.slot))
            # In place: a fused projection's weight is a view of its fused GEMM's, and a
            # captured CUDA graph keeps reading the same address.
            self._pristine[(m.layer, t)] = mod.weight.detach().clone()
            mod.weight.copy_(merged)
        self._merged = res
        res.refs += 1  # the weights use it: its slot must outlive a removal

    def unmerge(self) -> None:
        """Put the pristine base weights back (copies of their bits, so bit-exact)."""
        if self._merged is None:
            return
        for (layer, t), weight in self._pristine.items():
            self.model.target(layer, t).weight.copy_(weight)
        self._pristine.clear()
        res, self._merged = self._merged, None
        self.release(res)
