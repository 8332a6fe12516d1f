"""GPT-2 in plain torch, readable top to bottom (nanoGPT's layout, Hugging Face's weight names).

GPT-2 checkpoints store every projection Conv1D-style, `x @ W + b` with W [in, out]; hotlora
transposes them once at load (`gpt2_tensor`) and runs them as `Linear` ([out, in], the layout
CPU GEMMs run fastest), transposing back only when it saves a checkpoint. An optional
`AdapterHook` adds each token's LoRA delta to the output of the four adapter targets and its DEU
delta to the MLP activation; the model itself knows nothing about adapters or batching policy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from hotlora.adapters.layout import GPT2_LAYOUT, ModuleLayout, gpt2_dims
from hotlora.server.engine.errors import ModelLoadError
from hotlora.server.engine.models.base import (
    AdapterHook,
    AttnBatch,
    Linear,
    cached_attention,
    config_field,
    init_from_scratch,
)

C_ATTN, ATTN_PROJ, C_FC, MLP_PROJ = range(4)  # indices into GPT2_LAYOUT.targets

# The activations GPT-2-family checkpoints name in config.json, mapped to torch's approximations.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


@dataclass(frozen=True)
class GPT2Config:
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

    @property
    def n_kv_head(self) -> int:
        return self.n_head

    @property
    def max_positions(self) -> int:
        return self.n_positions

    @property
    def d_ff(self) -> int:
        return self.n_inner

    @property
    def layout(self) -> ModuleLayout:
        return GPT2_LAYOUT

    @property
    def attention_window(self) -> int | None:
        return None

    def target_dims(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of every projection an adapter may target."""
        return gpt2_dims(self.n_embd, self.n_inner)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], name: str = "gpt2") -> GPT2Config:
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
        n_embd, n_head = int(config_field(raw, "n_embd")), int(config_field(raw, "n_head"))
        if n_embd % n_head:
            raise ModelLoadError(
                f"config.json: n_embd={n_embd} is not divisible by n_head={n_head}"
            )
        eos = raw.get("eos_token_id")
        return cls(
            vocab_size=int(config_field(raw, "vocab_size")),
            n_positions=int(config_field(raw, "n_positions")),
            n_embd=n_embd,
            n_layer=int(config_field(raw, "n_layer")),
            n_head=n_head,
            n_inner=int(raw.get("n_inner") or 4 * n_embd),
            layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
            activation_function=act,
            scale_attn_by_inverse_layer_idx=bool(raw.get("scale_attn_by_inverse_layer_idx", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            name=name,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as transformers' GPT2Config writes the fields hotlora reads."""
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": self.activation_function,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": True,
        }


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int) -> None:
        super().__init__()
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=True)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=True)
        self.layer, self.n_head = layer, cfg.n_head
        scale = 1.0 / math.sqrt(cfg.head_dim)
        self.scale = scale / (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else scale

    def forward(self, x: Tensor, attn: AttnBatch | None, adapters: AdapterHook | None) -> Tensor:
        B, L, d = x.shape
        x2 = x.reshape(B * L, d)  # (T, d)
        qkv = self.c_attn(x2)  # (T, 3d)
        if adapters is not None:
            qkv = adapters.lora(self.layer, C_ATTN, x2, qkv)
        q, k, v = qkv.view(B, L, 3, self.n_head, d // self.n_head).permute(
            2, 0, 3, 1, 4
        )  # (B, H, L, D)
        if attn is None:  # training / reference: the whole sequence, no cache
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o = cached_attention(attn, self.layer, q, k, v, self.scale)  # (B, H, L, D)
        o2 = o.transpose(1, 2).reshape(B * L, d)  # (T, d)
        y = self.c_proj(o2)
        if adapters is not None:
            y = adapters.lora(self.layer, ATTN_PROJ, o2, y)
        return y.view(B, L, d)


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int) -> None:
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, cfg.n_inner, bias=True)
        self.c_proj = Linear(cfg.n_inner, cfg.n_embd, bias=True)
        self.layer, self.approximate = layer, ACTIVATIONS[cfg.activation_function]

    def forward(self, x: Tensor, adapters: AdapterHook | None) -> Tensor:
        B, L, d = x.shape
        x2 = x.reshape(B * L, d)  # (T, d)
        h = self.c_fc(x2)  # (T, d_ff)
        if adapters is not None:
            h = adapters.lora(self.layer, C_FC, x2, h)
        a = F.gelu(h, approximate=self.approximate)  # (T, d_ff)
        if adapters is not None:
            a = adapters.activation(self.layer, h, a)
        y = self.c_proj(a)  # (T, d)
        if adapters is not None:
            y = adapters.lora(self.layer, MLP_PROJ, a, y)
        return y.view(B, L, d)


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg, layer)

    def forward(self, x: Tensor, attn: AttnBatch | None, adapters: AdapterHook | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn, adapters)
        return x + self.mlp(self.ln_2(x), adapters)


class GPT2(nn.Module):
    """The GPT-2 transformer with its tied language-model head."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def init_weights(self, std: float = 0.02, seed: int = 0) -> None:
        """GPT-2's initialisation, for models trained from scratch."""
        init_from_scratch(self, "ln_", std, seed)

    def forward(
        self,
        input_ids: Tensor,  # (B, L)
        positions: Tensor,  # (B, L)
        attn: AttnBatch | None = None,
        adapters: AdapterHook | None = None,
    ) -> Tensor:
        """Final hidden states (B, L, d), after ln_f."""
        x = self.wte(input_ids) + self.wpe(positions)  # (B, L, d)
        for block in self.h:
            x = block(x, attn, adapters)
        x = self.ln_f(x)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        """Tied head: hidden (..., d) -> logits (..., V)."""
        return hidden @ self.wte.weight.T

    def target(self, layer: int, target: int) -> Linear:
        """The projection module an adapter target index names."""
        block: Block = self.h[layer]  # type: ignore[assignment]
        mods = (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
        return mods[target]

    def fuse_projections(self) -> None:
        """GPT-2's q/k/v are one projection (c_attn) already."""

    def base_gemms(self, layer: int) -> list[tuple[Tensor, Tensor | None]]:
        return [(m.weight, m.bias) for m in (self.target(layer, t) for t in range(4))]

    def hf_state_dict(self) -> dict[str, Tensor]:
        """The weights under GPT2LMHeadModel's names and layout (lm_head is tied, so not
        written): projection weights back to Conv1D's [in, out]."""
        return {f"transformer.{k}": gpt2_tensor(k, v) for k, v in self.state_dict().items()}


def gpt2_key(key: str, cfg: GPT2Config) -> str | None:
    """A checkpoint key -> hotlora's name, or None for what is not a weight of ours."""
    if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
        return None  # causal-mask buffers; lm_head is tied to wte
    for prefix in ("transformer.", "model."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


# The block projections are Conv1D modules; their names are the layout's adapter targets.
_CONV1D_WEIGHT = re.compile(
    rf"{re.escape(GPT2_LAYOUT.blocks)}\.\d+\.({'|'.join(map(re.escape, GPT2_LAYOUT.targets))})"
    r"\.weight"
)


def gpt2_tensor(name: str, tensor: Tensor) -> Tensor:
    """A checkpoint tensor under hotlora's name -> hotlora's layout: Conv1D weights [in, out]
    become [out, in] (contiguous). Its own inverse, so saving uses it too."""
    if _CONV1D_WEIGHT.fullmatch(name):
        return tensor.T.contiguous()
    return tensor
