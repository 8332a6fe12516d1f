"""Model families, chosen by config.json's model_type: one file per family beside base.py."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from hotlora.server.engine.errors import ModelLoadError
from hotlora.server.engine.models.base import (
    AdapterHook,
    AttnBatch,
    CausalLM,
    ModelSpec,
    Projection,
)
from hotlora.server.engine.models.gpt2 import GPT2, GPT2Config, gpt2_key, gpt2_tensor
from hotlora.server.engine.models.llama import Llama, llama_key
from hotlora.server.engine.models.llama_config import MODEL_TYPES as LLAMA_TYPES
from hotlora.server.engine.models.llama_config import LlamaConfig


@dataclass(frozen=True)
class Family:
    """How to read one family's config.json, build its model and map its checkpoint keys."""

    config: Callable[[Mapping[str, Any], str], Any]
    model: Callable[[Any], nn.Module]
    key: Callable[[str, Any], str | None]  # checkpoint key -> ours; None = not a weight
    tensor: Callable[[str, Tensor], Tensor] = lambda name, t: t  # by our name -> our layout


_GPT2 = Family(GPT2Config.from_dict, GPT2, gpt2_key, gpt2_tensor)
_LLAMA = Family(LlamaConfig.from_dict, Llama, llama_key)
FAMILIES: dict[str, Family] = {"gpt2": _GPT2, **{t: _LLAMA for t in LLAMA_TYPES}}


def family_of(raw: Mapping[str, Any]) -> Family:
    model_type = raw.get("model_type", "gpt2")  # GPT-2 configs predate the field
    family = FAMILIES.get(model_type)
    if family is None:
        raise ModelLoadError(
            f"config.json: model_type {model_type!r} is not supported (one of {sorted(FAMILIES)})"
        )
    return family


__all__ = [
    "FAMILIES",
    "GPT2",
    "AdapterHook",
    "AttnBatch",
    "CausalLM",
    "Family",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "ModelSpec",
    "Projection",
    "family_of",
]
