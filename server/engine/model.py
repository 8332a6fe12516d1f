"""GPT-2 in plain torch, readable top to bottom (nanoGPT's layout, Hugging Face's weight names).

Every projection is a Conv1D-style `x @ W + b` with W stored [in, out] exactly as GPT-2
checkpoints store it. An optional `AdapterHook` adds each token's LoRA delta to the output of
the four adapter targets and its DEU delta to the MLP activation; the model itself knows nothing
about adapters or batching policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from server.engine.config import ACTIVATIONS, ModelConfig

# Adapter targets in the order the hook receives their index.
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
C_ATTN, ATTN_PROJ, C_FC, MLP_PROJ = range(4)


class AdapterHook(Protocol):
    """Applies every token's adapter to the frozen model."""

    def lora(self, layer: int, target: int, x: Tensor, y: Tensor) -> Tensor:
        """y + delta(x) at adapter target `target` (an index into TARGETS)."""
        ...

    def activation(self, layer: int, h: Tensor, y: Tensor) -> Tensor:
        """The MLP activation's output y = GELU(h), adapted (y + g * D(h) for DEU rows)."""
        ...


@dataclass(frozen=True)
class AttnBatch:
    """Per-step view of the static KV cache, built once and shared by all layers.

    Query token (b, l) sits at position `positions[b, l]` of cache row `rows[b]`; it attends
    to every cached position <= its own, which `mask` encodes once for all layers.
    """

    k_cache: Tensor  # (n_layer, max_rows, H, S, D)
    v_cache: Tensor  # (n_layer, max_rows, H, S, D)
    rows: Tensor  # (B,) int64 cache rows
    row_range: tuple[int, int] | None  # (start, stop) when rows are contiguous: read a view
    positions: Tensor  # (B, L) int64
    mask: Tensor  # (B, 1, L, S_used) bool, True = attend
    s_used: int  # cache positions any query of this step can see


class Conv1D(nn.Module):
    """GPT-2's projection: y = x @ W + b with W stored [in, out]."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.weight)  # (T, d_out)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)
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
            k, v = self._cached_kv(attn, k, v)  # (B, H, S_used, D)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask, scale=self.scale)
        o2 = o.transpose(1, 2).reshape(B * L, d)  # (T, d)
        y = self.c_proj(o2)
        if adapters is not None:
            y = adapters.lora(self.layer, ATTN_PROJ, o2, y)
        return y.view(B, L, d)

    def _cached_kv(self, attn: AttnBatch, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's keys/values into the cache, return everything the queries may see."""
        kc, vc = attn.k_cache[self.layer], attn.v_cache[self.layer]  # (max_rows, H, S, D)
        rows = attn.rows[:, None].expand_as(attn.positions)  # (B, L)
        kc[rows, :, attn.positions] = k.transpose(1, 2)  # (B, L, H, D) scattered
        vc[rows, :, attn.positions] = v.transpose(1, 2)
        if attn.row_range is not None:
            lo, hi = attn.row_range
            return kc[lo:hi, :, : attn.s_used], vc[lo:hi, :, : attn.s_used]
        return kc[attn.rows, :, : attn.s_used], vc[attn.rows, :, : attn.s_used]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, cfg.n_inner)
        self.c_proj = Conv1D(cfg.n_inner, cfg.n_embd)
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
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
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

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def init_weights(self, std: float = 0.02, seed: int = 0) -> None:
        """GPT-2's initialisation, for models trained from scratch."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln_" in name:
                nn.init.ones_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

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

    def target(self, layer: int, target: int) -> Conv1D:
        """The projection module an adapter target index names."""
        block: Block = self.h[layer]  # type: ignore[assignment]
        mods = (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
        return mods[target]
