"""hotlora's DEU adapter format: learned per-neuron activation shapes for the frozen MLP.

A DEU adapter directory is a PEFT-style pair of files:

adapter_config.json
    {"peft_type": "DEU",                 # hotlora's own type
     "task_type": "CAUSAL_LM",           # optional
     "base_model_name_or_path": "...",   # optional, informational
     "layers": [0, 1, 2, 3],             # blocks whose MLP activation is adapted (null = all)
     "group_size": 1,                    # neurons [i*k, (i+1)*k) share parameter set i
     "lora": {...}}                      # optional: a complete PEFT LoRA config (LoRA+DEU)

adapter_model.safetensors
    base_model.model.transformer.h.{i}.mlp.deu.{a,b,c,c1,c2,gain}   shape (d_ff / group_size,)
    (Llama family: base_model.model.model.layers.{i}.mlp.deu.{...}, d_ff = intermediate_size)
    + the PEFT LoRA tensors (lora_A / lora_B) when the config embeds "lora".

Neuron j of layer i then computes act(h) + gain * D(h), act being GELU (GPT-2) or the SiLU of
the SwiGLU gate (Llama family), with D the unit of kernels/deu.py; a, b
and c must be positive (a stable system), everything finite. gain = 0 is the base model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hotlora.adapters.errors import AdapterError
from hotlora.adapters.format import BaseShapes, Entry, read_tensors
from hotlora.adapters.layout import GPT2_LAYOUT, ModuleLayout
from hotlora.kernels.deu_params import PARAMS

DEU_TYPE = "DEU"
_FIELDS = frozenset(
    {"peft_type", "task_type", "base_model_name_or_path", "layers", "group_size", "lora"}
)
_POSITIVE = ("a", "b", "c")


def is_deu_key(key: str) -> bool:
    """Whether a tensor key belongs to the DEU part of an adapter file."""
    return ".mlp.deu." in key


@dataclass(frozen=True)
class DEUConfig:
    layers: tuple[int, ...]  # ascending
    group_size: int
    base_model_name_or_path: str | None = None
    lora: Mapping[str, Any] | None = None  # the embedded PEFT LoRA config, as read
    layout: ModuleLayout = GPT2_LAYOUT  # the family whose MLP activations it adapts

    @classmethod
    def from_dict(cls, d: Any, adapter: str, base: BaseShapes) -> DEUConfig:
        """Validate a DEU adapter_config.json against the base model."""
        if not isinstance(d, dict):
            raise AdapterError(adapter, "must be a JSON object", "adapter_config.json")
        if d.get("peft_type") != DEU_TYPE:
            raise AdapterError(adapter, f"must be {DEU_TYPE!r}", "peft_type")
        unknown = sorted(set(d) - _FIELDS)
        if unknown:
            raise AdapterError(
                adapter, f"unknown field; DEU configs take {sorted(_FIELDS)}", unknown[0]
            )
        if d.get("task_type") not in (None, "CAUSAL_LM"):
            raise AdapterError(
                adapter, f"must be 'CAUSAL_LM' or null, got {d['task_type']!r}", "task_type"
            )
        name = d.get("base_model_name_or_path")
        if name is not None and not isinstance(name, str):
            raise AdapterError(adapter, "must be a string or null", "base_model_name_or_path")
        layers = d.get("layers")
        if layers is None:
            layers = list(range(base.n_layer))
        if not (
            isinstance(layers, list)
            and layers
            and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        ):
            raise AdapterError(
                adapter,
                f"must be a non-empty list of layer indices or null, got {layers!r}",
                "layers",
            )
        bad = [i for i in layers if not 0 <= i < base.n_layer]
        if bad:
            raise AdapterError(
                adapter, f"layer {bad[0]} is not one of the base's {base.n_layer} layers", "layers"
            )
        if len(set(layers)) != len(layers):
            raise AdapterError(adapter, "lists a layer twice", "layers")
        k = d.get("group_size", 1)
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise AdapterError(adapter, f"must be a positive integer, got {k!r}", "group_size")
        if base.d_ff % k:
            raise AdapterError(
                adapter, f"{k} does not divide the base's {base.d_ff} MLP neurons", "group_size"
            )
        lora = d.get("lora")
        if lora is not None and not isinstance(lora, dict):
            raise AdapterError(adapter, "must be a PEFT LoRA config object or null", "lora")
        return cls(tuple(sorted(layers)), k, name, lora, base.layout)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "peft_type": DEU_TYPE,
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "layers": list(self.layers),
            "group_size": self.group_size,
        }
        if self.lora is not None:
            d["lora"] = dict(self.lora)
        return d


@dataclass(frozen=True)
class DEUAdapter:
    """Per-layer parameter sets (6, d_ff / group_size): rows a, b, c, c1, c2, gain (float32)."""

    config: DEUConfig
    params: Mapping[int, Tensor]  # layer -> (6, G)

    def neuron_params(self, layer: int) -> Tensor:
        """(6, d_ff): each group's parameter set repeated over its neurons."""
        return self.params[layer].repeat_interleave(self.config.group_size, dim=1)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def size_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params.values())


def deu_from_file(
    config: DEUConfig, entries: list[Entry], weights: Path, *, name: str, base: BaseShapes
) -> DEUAdapter:
    """Check the DEU tensors of a file against its config and the base, then read them."""
    groups = base.d_ff // config.group_size
    layout = base.layout
    key_re, deu_key = layout.deu_key_re, layout.deu_key
    found: dict[tuple[int, str], Entry] = {}
    for e in entries:
        m = key_re.fullmatch(e.key)
        if m is None or m.group("param") not in PARAMS:
            raise AdapterError(
                name,
                "not a DEU tensor key (expected "
                f"{deu_key(0, '').replace('.0.', '.{i}.')}{{{','.join(PARAMS)}}})",
                e.key,
            )
        layer = int(m.group("layer"))
        if layer >= base.n_layer:
            raise AdapterError(
                name, f"layer {layer} is beyond the base's {base.n_layer} layers", e.key
            )
        if layer not in config.layers:
            raise AdapterError(name, f"layer {layer} is not in the config's layers", e.key)
        if e.shape != (groups,):
            raise AdapterError(
                name,
                f"shape {e.shape} does not fit; expected ({groups},) = "
                f"{base.d_ff} neurons / group_size {config.group_size}",
                e.key,
            )
        if e.dtype not in ("F16", "BF16", "F32", "F64"):
            raise AdapterError(name, f"dtype {e.dtype} is not a float type", e.key)
        found[(layer, m.group("param"))] = e
    for layer in config.layers:
        for p in PARAMS:
            if (layer, p) not in found:
                raise AdapterError(
                    name,
                    f"the config lists layer {layer} but the file has no {p!r} for it",
                    deu_key(layer, p),
                )
    tensors = read_tensors(weights, name, list(found.values()))
    params = {}
    for layer in config.layers:
        rows = [tensors[deu_key(layer, p)] for p in PARAMS]
        for p in _POSITIVE:
            if not bool((tensors[deu_key(layer, p)] > 0).all()):
                raise AdapterError(
                    name,
                    f"{p} must be > 0 (the ODE's coefficients of a stable system)",
                    deu_key(layer, p),
                )
        params[layer] = torch.stack(rows)  # (6, G)
    return DEUAdapter(config, params)


def deu_tensors(adapter: DEUAdapter, name: str) -> dict[str, Tensor]:
    """The adapter's float32 CPU tensors under their file keys (checked against its config;
    the base's width is checked when the file is loaded)."""
    out = {}
    if sorted(adapter.params) != list(adapter.config.layers):
        raise AdapterError(
            name,
            f"parameters for layers {sorted(adapter.params)} but the "
            f"config lists {list(adapter.config.layers)}",
            "layers",
        )
    key = adapter.config.layout.deu_key
    for layer, p in adapter.params.items():
        if p.dim() != 2 or p.shape[0] != len(PARAMS):
            raise AdapterError(
                name, f"layer {layer}: parameters must be (6, G), got {tuple(p.shape)}", "params"
            )
        for i, pname in enumerate(PARAMS):
            out[key(layer, pname)] = p[i].detach().to("cpu", torch.float32).clone()  # (G,)
    return out
