"""The Llama family in plain torch: Llama, Mistral, Qwen2 and Qwen3 share one block.

    x -> x + o(attn(rope(q(n(x))), rope(k(n(x))), v(n(x))))
    x -> x + down(silu(gate(n(x))) * up(n(x)))

with RMSNorm n, grouped-query attention (the KV cache holds only the KV heads) and rotary
positions. The families differ only in config flags read once at load: biases on q/k/v (Qwen2,
Llama's attention_bias), a bias on o (attention_bias), MLP biases (Llama's mlp_bias), per-head
RMSNorm on q and k (Qwen3), and the RoPE frequencies (default, linear or llama3 scaling).
Weight names are Hugging Face's, with Linear weights stored [out, in].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hotlora.server.engine.models.base import (
    AdapterHook,
    AttnBatch,
    Linear,
    cached_attention,
    fuse_linears,
    init_from_scratch,
)
from hotlora.server.engine.models.llama_config import LlamaConfig

Q, K, V, OUT, GATE, UP, DOWN = range(7)  # indices into LLAMA_LAYOUT.targets

_ROPE_TABLE = 8192  # positions whose cos/sin are precomputed; longer contexts grow it once


class RMSNorm(nn.Module):
    """x / rms(x) * w, normalised in float32 and cast back before the weight (as transformers)."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on (B, H, L, D) with cos/sin (B, 1, L, D): the rotate-half form Hugging Face uses."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, H, L, D)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        dims = cfg.target_dims()
        self.q_proj = Linear(*dims["self_attn.q_proj"], bias=cfg.qkv_bias)
        self.k_proj = Linear(*dims["self_attn.k_proj"], bias=cfg.qkv_bias)
        self.v_proj = Linear(*dims["self_attn.v_proj"], bias=cfg.qkv_bias)
        self.o_proj = Linear(*dims["self_attn.o_proj"], bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.layer, self.n_head, self.n_kv, self.head_dim = (
            layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        )
        self.scale = cfg.head_dim**-0.5
        self.qkv: tuple[Tensor, Tensor | None] | None = None  # set by fuse()
        self.qkv_sizes = (cfg.n_head * cfg.head_dim, *[cfg.n_kv_head * cfg.head_dim] * 2)

    def fuse(self) -> None:
        self.qkv = fuse_linears([self.q_proj, self.k_proj, self.v_proj])

    def _project(self, x2: Tensor, adapters: AdapterHook | None) -> list[Tensor]:
        """q, k, v (T, heads * D): one GEMM once fused, then each target's adapter delta."""
        if self.qkv is None:  # training and reference use: three Parameters to differentiate
            ys = [p(x2) for p in (self.q_proj, self.k_proj, self.v_proj)]
        else:
            ys = list(F.linear(x2, *self.qkv).split(self.qkv_sizes, dim=1))  # column views
        if adapters is not None:
            ys = [adapters.lora(self.layer, t, x2, y) for t, y in zip((Q, K, V), ys, strict=True)]
        return ys

    def _heads(self, y: Tensor, norm: RMSNorm | None, heads: int, B: int) -> Tensor:
        y = y.view(B, -1, heads, self.head_dim)  # (B, L, heads, D)
        if norm is not None:
            y = norm(y)
        return y.transpose(1, 2)  # (B, heads, L, D)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        attn: AttnBatch | None,
        adapters: AdapterHook | None,
    ) -> Tensor:
        B, L, d = x.shape
        x2 = x.reshape(B * L, d)  # (T, d)
        q2, k2, v2 = self._project(x2, adapters)
        q = self._heads(q2, self.q_norm, self.n_head, B)
        k = self._heads(k2, self.k_norm, self.n_kv, B)
        v = self._heads(v2, None, self.n_kv, B)
        cos, sin = rope
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # (B, H, L, D), (B, H_kv, L, D)
        gqa = self.n_kv != self.n_head
        if attn is None:  # training / reference: the whole sequence, no cache
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa
            )
        else:
            o = cached_attention(attn, self.layer, q, k, v, self.scale)  # (B, H, L, D)
        o2 = o.transpose(1, 2).reshape(B * L, self.n_head * self.head_dim)  # (T, H * D)
        y = self.o_proj(o2)
        if adapters is not None:
            y = adapters.lora(self.layer, OUT, o2, y)
        return y.view(B, L, d)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); a DEU adapter reshapes the silu per neuron."""

    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        dims = cfg.target_dims()
        self.gate_proj = Linear(*dims["mlp.gate_proj"], bias=cfg.mlp_bias)
        self.up_proj = Linear(*dims["mlp.up_proj"], bias=cfg.mlp_bias)
        self.down_proj = Linear(*dims["mlp.down_proj"], bias=cfg.mlp_bias)
        self.layer = layer
        self.gate_up: tuple[Tensor, Tensor | None] | None = None  # set by fuse()

    def fuse(self) -> None:
        self.gate_up = fuse_linears([self.gate_proj, self.up_proj])

    def forward(self, x: Tensor, adapters: AdapterHook | None) -> Tensor:
        B, L, d = x.shape
        x2 = x.reshape(B * L, d)  # (T, d)
        if self.gate_up is None:  # training and reference use
            g, u = self.gate_proj(x2), self.up_proj(x2)  # (T, d_ff) each
        else:
            g, u = F.linear(x2, *self.gate_up).chunk(2, dim=1)  # (T, d_ff) column views
        if adapters is not None:
            g = adapters.lora(self.layer, GATE, x2, g)
            u = adapters.lora(self.layer, UP, x2, u)
        a = F.silu(g)  # (T, d_ff)
        if adapters is not None:
            a = adapters.activation(self.layer, g, a)
        m = a * u  # (T, d_ff)
        y = self.down_proj(m)  # (T, d)
        if adapters is not None:
            y = adapters.lora(self.layer, DOWN, m, y)
        return y.view(B, L, d)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        attn: AttnBatch | None,
        adapters: AdapterHook | None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, attn, adapters)
        return x + self.mlp(self.post_attention_layernorm(x), adapters)


class Llama(nn.Module):
    """A Llama-family decoder with its language-model head (tied to the embedding or not)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (
            None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, False)
        )
        self._rope_cache: tuple[Tensor, Tensor] | None = None

    def init_weights(self, std: float = 0.02, seed: int = 0) -> None:
        """Llama's initialisation, for models trained from scratch."""
        init_from_scratch(self, "norm", std, seed)

    def _rope_table(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin (P, D) float32 for positions [0, P), P >= n: computed once, grown rarely."""
        cache = self._rope_cache
        if cache is None or cache[0].shape[0] < n or cache[0].device != device:
            size = max(n, min(_ROPE_TABLE, self.cfg.max_position_embeddings))
            inv = self.cfg.rope.inv_freq(self.cfg.rope_theta, self.cfg.head_dim).to(device)
            freqs = torch.arange(size, device=device).float()[:, None] * inv  # (P, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (P, D)
            cache = self._rope_cache = (emb.cos(), emb.sin())
        return cache

    def forward(
        self,
        input_ids: Tensor,  # (B, L)
        positions: Tensor,  # (B, L)
        attn: AttnBatch | None = None,
        adapters: AdapterHook | None = None,
    ) -> Tensor:
        """Final hidden states (B, L, d), after the last RMSNorm."""
        x = self.embed_tokens(input_ids)  # (B, L, d)
        # The step's host-side extent, so the table lookup never syncs with the device.
        extent = attn.s_used if attn is not None else positions.shape[1]
        cos_t, sin_t = self._rope_table(extent, x.device)
        rope = (
            cos_t[positions][:, None].to(x.dtype),  # (B, 1, L, D)
            sin_t[positions][:, None].to(x.dtype),
        )
        for block in self.layers:
            x = block(x, rope, attn, adapters)
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., d) -> logits (..., V)."""
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, head)

    def target(self, layer: int, target: int) -> Linear:
        """The projection module an adapter target index names."""
        block: Block = self.layers[layer]  # type: ignore[assignment]
        a, m = block.self_attn, block.mlp
        mods = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
        return mods[target]

    def fuse_projections(self) -> None:
        """q/k/v and gate/up each become one GEMM (serving; training keeps them apart)."""
        for layer in range(self.cfg.n_layer):
            block: Block = self.layers[layer]  # type: ignore[assignment]
            block.self_attn.fuse()
            block.mlp.fuse()

    def base_gemms(self, layer: int) -> list[tuple[Tensor, Tensor | None]]:
        block: Block = self.layers[layer]  # type: ignore[assignment]
        a, m = block.self_attn, block.mlp
        if a.qkv is None or m.gate_up is None:
            return [(p.weight, p.bias) for p in (self.target(layer, t) for t in range(7))]
        o, down = a.o_proj, m.down_proj
        return [a.qkv, (o.weight, o.bias), m.gate_up, (down.weight, down.bias)]

    def hf_state_dict(self) -> dict[str, Tensor]:
        """The weights under LlamaForCausalLM's names."""
        out = {f"model.{k}": v for k, v in self.state_dict().items() if not k.startswith("lm_")}
        if self.lm_head is not None:
            out["lm_head.weight"] = self.lm_head.weight
        return out


def llama_key(key: str, cfg: LlamaConfig) -> str | None:
    """A checkpoint key -> hotlora's name, or None for what is not a weight of ours."""
    if key.endswith("rotary_emb.inv_freq"):
        return None  # a buffer older checkpoints carry
    if key == "lm_head.weight":
        return None if cfg.tie_word_embeddings else key  # a tied head is the embedding
    return key[len("model.") :] if key.startswith("model.") else key
