"""Frozen configuration of the base model and of the engine."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.engine.errors import ModelLoadError

# The activations GPT-2-family checkpoints name in config.json, mapped to torch's approximations.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


@dataclass(frozen=True)
class ModelConfig:
    """The GPT-2 hyper-parameters hotlora reads from a Hugging Face config.json."""

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = "gpt2"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def target_dims(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of every projection an adapter may target."""
        d, f = self.n_embd, self.n_inner
        return {
            "attn.c_attn": (d, 3 * d),
            "attn.c_proj": (d, d),
            "mlp.c_fc": (d, f),
            "mlp.c_proj": (f, d),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], name: str = "gpt2") -> ModelConfig:
        def field(key: str, default: Any = None) -> Any:
            value = raw.get(key, default)
            if value is None and default is None:
                raise ModelLoadError(f"config.json: missing field {key!r}")
            return value

        mt = raw.get("model_type", "gpt2")
        if mt != "gpt2":
            raise ModelLoadError(f"config.json: model_type {mt!r} is not supported (only 'gpt2')")
        act = raw.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ModelLoadError(
                f"config.json: activation_function {act!r} is not supported "
                f"(one of {sorted(ACTIVATIONS)})"
            )
        if raw.get("reorder_and_upcast_attn", False):
            raise ModelLoadError("config.json: reorder_and_upcast_attn=true is not supported")
        if not raw.get("scale_attn_weights", True):
            raise ModelLoadError("config.json: scale_attn_weights=false is not supported")
        n_embd, n_head = int(field("n_embd")), int(field("n_head"))
        if n_embd % n_head:
            raise ModelLoadError(
                f"config.json: n_embd={n_embd} is not divisible by n_head={n_head}"
            )
        eos = raw.get("eos_token_id")
        return cls(
            vocab_size=int(field("vocab_size")),
            n_positions=int(field("n_positions")),
            n_embd=n_embd,
            n_layer=int(field("n_layer")),
            n_head=n_head,
            n_inner=int(raw.get("n_inner") or 4 * n_embd),
            layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
            activation_function=act,
            scale_attn_by_inverse_layer_idx=bool(raw.get("scale_attn_by_inverse_layer_idx", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            name=name,
        )

    @classmethod
    def from_file(cls, path: Path, name: str) -> ModelConfig:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ModelLoadError(f"{path}: config.json not found") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, name=name)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 matmul is ~100x slower than fp32 on CPUs without AMX; fp16 is the safe GPU default.
    return torch.float16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class EngineConfig:
    """Capacity of the engine, fixed at start-up (every buffer is preallocated from it)."""

    max_batch: int = 32  # KV-cache rows: requests decoded together
    max_seq_len: int | None = None  # None = the model's n_positions
    max_adapters: int = 32  # device slots for LoRA adapters
    max_rank: int = 16
    device: str | None = None  # None = cuda if available else cpu
    dtype: str | None = None  # "float32" | "float16" | "bfloat16"; None = per device

    def __post_init__(self) -> None:
        for key in ("max_batch", "max_adapters", "max_rank"):
            if getattr(self, key) < 1:
                raise ValueError(f"EngineConfig.{key} must be >= 1, got {getattr(self, key)}")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(
                f"EngineConfig.dtype must be float32, float16 or bfloat16, got {self.dtype!r}"
            )

    def torch_device(self) -> torch.device:
        return torch.device(self.device) if self.device else default_device()

    def torch_dtype(self) -> torch.dtype:
        if self.dtype is None:
            return default_dtype(self.torch_device())
        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype
