"""Builders for the adapter-format tests: tiny GPT-2s wrapped by peft, and hand-written adapters."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from hotlora.adapters.format import BaseShapes
from hotlora.adapters.lora_config import TARGETS

N_LAYER, N_EMBD = 3, 32
BASE = BaseShapes.gpt2(N_LAYER, N_EMBD)


def tiny_gpt2(seed: int = 0, bare: bool = False) -> Any:
    """A random GPT-2 (LM head, or bare GPT2Model); the same seed gives the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=N_EMBD, n_layer=N_LAYER, n_head=4, n_positions=64, vocab_size=100,
                     bos_token_id=0, eos_token_id=0)
    return (GPT2Model if bare else GPT2LMHeadModel)(cfg).eval()


def peft_adapter(path: Path, seed: int, bare: bool = False, **lora_kwargs: Any) -> Any:
    """Wrap tiny_gpt2() with peft, give every lora_A/lora_B random non-zero values, save it."""
    from peft import LoraConfig, get_peft_model

    kwargs: dict[str, Any] = {"r": 4, "lora_alpha": 8}
    if not bare:
        kwargs["task_type"] = "CAUSAL_LM"
    kwargs.update(lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's fan_in_fan_out notice for Conv1D
        model = get_peft_model(tiny_gpt2(bare=bare), LoraConfig(**kwargs)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # peft zero-inits B; random values make every mistake visible
                p.copy_(torch.randn(p.shape, generator=gen))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about lora_B.bias when lora_bias=True
        model.save_pretrained(path)
    return model


def peft_lora_modules(model: Any) -> dict[str, Any]:
    """Base-model module name -> peft LoRA layer, for every module peft wrapped."""
    return {
        name.removeprefix("base_model.model."): m
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
    }


def valid_config(**overrides: Any) -> dict[str, Any]:
    """A minimal adapter_config.json hotlora accepts: r=2 on attn.c_attn + mlp.c_fc."""
    cfg: dict[str, Any] = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2,
                           "lora_alpha": 4, "target_modules": ["c_attn", "c_fc"],
                           "bias": "none", "fan_in_fan_out": True}
    cfg.update(overrides)
    return cfg


def valid_tensors(r: int = 2, targets: tuple[str, ...] = ("attn.c_attn", "mlp.c_fc"),
                  prefix: str = "base_model.model.transformer.") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(N_LAYER):
        for t in targets:
            d_in, d_out = BASE.dims[t]
            key = f"{prefix}h.{layer}.{t}"
            out[f"{key}.lora_A.weight"] = torch.randn(r, d_in, generator=gen)  # (r, d_in)
            out[f"{key}.lora_B.weight"] = torch.randn(d_out, r, generator=gen)  # (d_out, r)
    assert set(targets) <= set(TARGETS)
    return out


def write_adapter(path: Path, config: Any, tensors: dict[str, torch.Tensor] | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(autouse=True, scope="package")
def _one_thread() -> Iterator[None]:
    """The models here are tiny: extra intra-op threads only spin on the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def valid_dir(tmp_path: Path) -> Path:
    return write_adapter(tmp_path / "ok", valid_config(), valid_tensors())
