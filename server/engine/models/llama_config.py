"""The Llama family's config (Llama, Mistral, Qwen2, Qwen3): read once from config.json, with
transformers' per-family defaults, every unsupported setting refused naming its field."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hotlora.adapters.layout import LLAMA_LAYOUT, ModuleLayout, llama_dims
from hotlora.server.engine.errors import ModelLoadError
from hotlora.server.engine.models.base import config_field

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3")
# transformers' per-family defaults for fields a config.json may omit.
_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (Hugging Face's rope_parameters / rope_scaling)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, theta: float, head_dim: int) -> Tensor:
        """(head_dim / 2,) float32 inverse frequencies, as transformers computes them."""
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv = 1.0 / (theta**exponent)  # (D/2,)
        if self.rope_type == "linear":
            return inv / self.factor
        if self.rope_type == "llama3":
            old = self.original_max_position_embeddings
            low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv


@dataclass(frozen=True)
class LlamaConfig:
    """The hyper-parameters hotlora reads from a Llama/Mistral/Qwen2/Qwen3 config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope: RopeScaling = RopeScaling()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    attention_window: int | None = None  # sliding window, if the checkpoint uses one
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = "llama"

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def d_ff(self) -> int:
        return self.intermediate_size

    @property
    def layout(self) -> ModuleLayout:
        return LLAMA_LAYOUT

    def target_dims(self) -> dict[str, tuple[int, int]]:
        q, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        return llama_dims(self.hidden_size, self.intermediate_size, q, kv)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], name: str = "llama") -> LlamaConfig:
        mt = raw.get("model_type")
        if mt not in MODEL_TYPES:
            raise ModelLoadError(f"config.json: model_type {mt!r} is not one of {MODEL_TYPES}")

        def integer(key: str, default: Any = None) -> int:
            value = config_field(raw, key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelLoadError(
                    f"config.json: {key} must be a positive integer, got {value!r}"
                )
            return value

        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
        hidden, n_head = integer("hidden_size"), integer("num_attention_heads")
        n_kv = integer("num_key_value_heads", n_head)
        if n_head % n_kv:
            raise ModelLoadError(
                f"config.json: num_key_value_heads={n_kv} does not divide "
                f"num_attention_heads={n_head}"
            )
        # Qwen3Config defaults head_dim to 128; the others derive it from the hidden size.
        default_head_dim = 128 if mt == "qwen3" and "head_dim" not in raw else None
        if default_head_dim is None and raw.get("head_dim") is None:
            if hidden % n_head:
                raise ModelLoadError(
                    f"config.json: hidden_size={hidden} is not divisible by "
                    f"num_attention_heads={n_head}; give head_dim"
                )
            default_head_dim = hidden // n_head
        head_dim = integer("head_dim", default_head_dim)
        if head_dim % 2:
            raise ModelLoadError(f"config.json: head_dim={head_dim} must be even (RoPE)")
        max_pos = integer("max_position_embeddings", _MAX_POSITIONS[mt])
        theta, rope = _rope(raw, max_pos)
        eos_raw = raw.get("eos_token_id")
        eos: Any = eos_raw[0] if isinstance(eos_raw, list) and eos_raw else eos_raw
        bos = raw.get("bos_token_id")
        for key, value in (("eos_token_id", eos), ("bos_token_id", bos)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ModelLoadError(f"config.json: {key} must be an int (eos: or a list), got "
                                     f"{raw.get(key)!r}")
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            model_type=mt,
            vocab_size=integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=integer("intermediate_size"),
            n_layer=integer("num_hidden_layers"),
            n_head=n_head,
            n_kv_head=n_kv,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=_number(raw, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope=rope,
            # Qwen2 always has q/k/v biases and no o bias; Mistral has neither.
            qkv_bias=mt == "qwen2" or (attention_bias and mt in ("llama", "qwen3")),
            o_bias=attention_bias and mt in ("llama", "qwen3"),
            mlp_bias=bool(raw.get("mlp_bias", False)) and mt == "llama",
            qk_norm=mt == "qwen3",
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_window=_window(raw, mt, integer("num_hidden_layers")),
            bos_token_id=bos,
            eos_token_id=eos,
            name=name,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as transformers 5 writes it for this family."""
        rope: dict[str, Any] = {"rope_type": self.rope.rope_type, "rope_theta": self.rope_theta}
        if self.rope.rope_type != "default":
            rope["factor"] = self.rope.factor
        if self.rope.rope_type == "llama3":
            rope |= {
                "low_freq_factor": self.rope.low_freq_factor,
                "high_freq_factor": self.rope.high_freq_factor,
                "original_max_position_embeddings": self.rope.original_max_position_embeddings,
            }
        out: dict[str, Any] = {
            "model_type": self.model_type,
            "architectures": [_ARCHITECTURES[self.model_type]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.o_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.attention_window
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        return out


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _rope(raw: Mapping[str, Any], max_pos: int) -> tuple[float, RopeScaling]:
    """rope_theta and the scaling, from transformers 5's rope_parameters or 4's rope_scaling."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ModelLoadError(f"config.json: rope_parameters must be an object, got {params!r}")
    theta = _number(params, "rope_theta", _number(raw, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ModelLoadError(
            f"config.json: rope_scaling type {kind!r} is not supported (one of {ROPE_TYPES})"
        )
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ModelLoadError(f"config.json: partial_rotary_factor={partial} is not supported")
    if kind == "default":
        return theta, RopeScaling()
    for key in ("factor", "low_freq_factor", "high_freq_factor")[: 1 if kind == "linear" else 3]:
        if params.get(key) is None:
            raise ModelLoadError(f"config.json: rope_scaling type {kind!r} needs {key!r}")
    factor = _number(params, "factor", 1.0)
    if kind == "linear":
        return theta, RopeScaling("linear", factor)
    old = params.get("original_max_position_embeddings") or max_pos
    if not isinstance(old, int) or isinstance(old, bool) or old < 1:
        raise ModelLoadError(f"config.json: original_max_position_embeddings must be a positive "
                             f"integer, got {old!r}")
    return theta, RopeScaling(
        "llama3",
        factor,
        _number(params, "low_freq_factor", 1.0),
        _number(params, "high_freq_factor", 4.0),
        old,
    )


def _number(raw: Mapping[str, Any], key: str, default: float) -> float:
    """A finite positive number from config.json; null or absent means the default."""
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ModelLoadError(f"config.json: {key} must be a positive number, got {value!r}")
    return float(value)


def _window(raw: Mapping[str, Any], model_type: str, n_layer: int) -> int | None:
    """The attention window transformers applies: Mistral's sliding_window (4096 when the key is
    absent, none when null); Qwen2/3's only with use_sliding_window, on the layers from
    max_window_layers on (or those layer_types marks); Llama has none."""
    window = raw.get("sliding_window", 4096)
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)):
        raise ModelLoadError(f"config.json: sliding_window must be an int or null, got {window!r}")
    if model_type == "mistral":
        return window
    if model_type == "llama" or not raw.get("use_sliding_window", False) or window is None:
        return None
    first = raw.get("max_window_layers", 28)
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(n_layer)
    ]
    return window if "sliding_attention" in layer_types else None
