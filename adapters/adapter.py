"""One served adapter: a LoRA part, a DEU part, or both under one name.

`load_adapter` reads any adapter directory hotlora serves: a PEFT LoRA directory
(peft_type "LORA"), a DEU directory (peft_type "DEU", adapters/deu_format.py), or a DEU
directory embedding a PEFT LoRA config under "lora" with both tensor sets in one file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Literal

from hotlora.adapters.deu_format import (
    DEU_TYPE,
    DEUAdapter,
    DEUConfig,
    deu_from_file,
    deu_tensors,
    is_deu_key,
)
from hotlora.adapters.errors import AdapterError
from hotlora.adapters.format import (
    BaseShapes,
    LoRAAdapter,
    lora_from_file,
    lora_tensors,
    read_adapter_dir,
    read_header,
    write_adapter_dir,
)

Kind = Literal["lora", "deu", "lora+deu"]


@dataclass(frozen=True)
class Adapter:
    name: str
    lora: LoRAAdapter | None = None
    deu: DEUAdapter | None = None

    def __post_init__(self) -> None:
        if self.lora is None and self.deu is None:
            raise AdapterError(self.name, "has neither a LoRA nor a DEU part")

    @property
    def kind(self) -> Kind:
        if self.lora is None:
            return "deu"
        return "lora" if self.deu is None else "lora+deu"

    @property
    def rank(self) -> int:
        """The LoRA rank (0 for a DEU-only adapter)."""
        return 0 if self.lora is None else self.lora.rank

    @property
    def size_bytes(self) -> int:
        return sum(p.size_bytes for p in (self.lora, self.deu) if p is not None)

    def renamed(self, name: str) -> Adapter:
        lora = None if self.lora is None else dataclasses.replace(self.lora, name=name)
        return Adapter(name, lora, self.deu)


def load_adapter(
    path: str | os.PathLike[str], *, name: str, base: BaseShapes, max_rank: int
) -> Adapter:
    """Load and validate an adapter directory; raise AdapterError for anything refused."""
    raw, weights = read_adapter_dir(path, name)
    entries = read_header(weights, name)
    if not (isinstance(raw, dict) and raw.get("peft_type") == DEU_TYPE):
        return Adapter(
            name,
            lora=lora_from_file(raw, entries, weights, name=name, base=base, max_rank=max_rank),
        )
    config = DEUConfig.from_dict(raw, name, base)
    deu_entries = [e for e in entries if is_deu_key(e.key)]
    rest = [e for e in entries if not is_deu_key(e.key)]
    lora = None
    if config.lora is not None:
        lora = lora_from_file(config.lora, rest, weights, name=name, base=base, max_rank=max_rank)
    elif rest:
        raise AdapterError(
            name, "not a DEU tensor, and the config embeds no LoRA part", rest[0].key
        )
    return Adapter(name, lora, deu_from_file(config, deu_entries, weights, name=name, base=base))


def save_adapter(path: str | os.PathLike[str], adapter: Adapter) -> None:
    """Write an adapter directory that `load_adapter` reads back exactly."""
    if adapter.deu is None:
        assert adapter.lora is not None
        write_adapter_dir(path, adapter.lora.config.to_dict(), lora_tensors(adapter.lora))
        return
    config = adapter.deu.config
    tensors = deu_tensors(adapter.deu, adapter.name)
    if adapter.lora is not None:
        layout = adapter.lora.config.layout
        if adapter.lora.prefix != layout.model_prefix:
            raise AdapterError(
                adapter.name,
                "the LoRA part of a LoRA+DEU adapter must use the "
                f"{layout.model_prefix}{layout.blocks} layout",
                "key_prefix",
            )
        config = dataclasses.replace(config, lora=adapter.lora.config.to_dict())
        tensors |= lora_tensors(adapter.lora)
    elif config.lora is not None:
        config = dataclasses.replace(config, lora=None)
    write_adapter_dir(path, config.to_dict(), tensors)
