"""What every model family shares: the adapter hook, the per-step attention view, the KV-cache
read/write, and the small interfaces the engine reads from a family's config and model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hotlora.adapters.layout import ModuleLayout
from hotlora.kernels.attention import decode_attention
from hotlora.server.engine.errors import ModelLoadError


class AdapterHook(Protocol):
    """Applies every token's adapter to the frozen model."""

    def lora(self, layer: int, target: int, x: Tensor, y: Tensor) -> Tensor:
        """y + delta(x) at adapter target `target` (an index into the layout's targets)."""
        ...

    def activation(self, layer: int, h: Tensor, y: Tensor) -> Tensor:
        """The MLP activation's output y = act(h), adapted (y + g * D(h) for DEU rows)."""
        ...


@dataclass(frozen=True)
class AttnBatch:
    """Per-step view of the static KV cache, built once and shared by all layers.

    Query token (b, l) sits at position `positions[b, l]` of cache row `rows[b]`; it attends
    to every cached position <= its own, which `bias` encodes once for all layers.
    """

    k_cache: Tensor  # (n_layer, max_rows, H_kv, S, D)
    v_cache: Tensor  # (n_layer, max_rows, H_kv, S, D)
    rows: Tensor  # (B,) int64 cache rows
    row_range: tuple[int, int] | None  # (start, stop) when rows are contiguous: read a view
    positions: Tensor  # (B, L) int64
    # Where each query token's key of each KV head goes in one layer's cache flattened to
    # (max_rows * H_kv * S, D): one index_put per layer instead of a 3-index scatter.
    kv_index: Tensor  # (B, L, H_kv) int64
    bias: Tensor | None  # (B, 1, L, S_used) in the model's dtype: 0 = attend, -inf = masked
    s_used: int  # cache positions any query of this step can see
    # Set for a decode step of fixed shape (a CUDA graph's): row b's query sees cache positions
    # [0, lengths[b]) of cache row rows[b], read in place by decode_attention (no bias, no view).
    lengths: Tensor | None = None  # (B,) int64


def cached_attention(
    attn: AttnBatch, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float
) -> Tensor:
    """Write this step's keys/values (B, H_kv, L, D) into the cache, then attend the queries
    q (B, H, L, D) to every cached position each may see: (B, H, L, D)."""
    if attn.lengths is not None:  # fixed-shape decode: the cache is read in place
        kc, vc = _write_kv(attn, layer, k, v)
        o = decode_attention(q[:, :, 0], kc, vc, attn.rows, attn.lengths, scale)  # (B, H, D)
        return o.unsqueeze(2)
    if attn.bias is None:
        raise ValueError("an AttnBatch needs a bias or lengths")
    k, v = cached_kv(attn, layer, k, v)  # (B, H_kv, S_used, D)
    return attend(q, k, v, attn.bias, scale)


def _write_kv(attn: AttnBatch, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Write keys/values (B, H_kv, L, D) at kv_index; the layer's caches (max_rows, H_kv, S, D)."""
    kc, vc = attn.k_cache[layer], attn.v_cache[layer]  # (max_rows, H_kv, S, D)
    D = kc.shape[-1]
    kc.view(-1, D).index_put_((attn.kv_index,), k.transpose(1, 2))  # (B, L, H_kv, D) rows
    vc.view(-1, D).index_put_((attn.kv_index,), v.transpose(1, 2))
    return kc, vc


def cached_kv(attn: AttnBatch, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Write this step's keys/values (B, H_kv, L, D) into the cache; return everything the
    queries may see, (B, H_kv, S_used, D)."""
    kc, vc = _write_kv(attn, layer, k, v)
    if attn.row_range is not None:
        lo, hi = attn.row_range
        return kc[lo:hi, :, : attn.s_used], vc[lo:hi, :, : attn.s_used]
    return kc[attn.rows, :, : attn.s_used], vc[attn.rows, :, : attn.s_used]


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale + bias) v, each query head h reading KV head h // (H / H_kv).

    q (B, H, L, D), k and v (B, H_kv, S, D), bias (B, 1, L, S) -> (B, H, L, D). CUDA and CPU
    float32 / float64 run SDPA. CPU half precision runs two batched matmuls instead: there
    SDPA's flash kernel measured 1.7-7x slower at decode shapes with B >= 8 (B = 32, L = 1,
    S = 45: 1.2-1.7 ms a layer against 0.25-0.48 ms), while in float32 it was as fast or faster
    (B = 1: 18 us against 39). As in transformers' eager attention, the products run in q's
    dtype and the softmax in float32.
    """
    B, H, L, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    if q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=scale, enable_gqa=H_kv != H
        )
    G = H // H_kv
    qg = q.reshape(B, H_kv, G * L, D)  # a KV head's query heads side by side
    if L == 1:  # decode: cached keys times queries, the matrix-vector form CPU GEMMs favour
        scores = torch.matmul(k, qg.transpose(2, 3)).transpose(2, 3)  # (B, H_kv, G, S)
    else:
        scores = torch.matmul(qg, k.transpose(2, 3))  # (B, H_kv, G * L, S)
    logits = scores.reshape(B, H_kv, G, L, S).float().mul_(scale).add_(bias.unsqueeze(2))
    p = torch.softmax(logits, dim=-1).to(q.dtype)  # (B, H_kv, G, L, S)
    return torch.matmul(p.view(B, H_kv, G * L, S), v).view(B, H, L, D)


def config_field(raw: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """A config.json field; absent or null means `default` (as in transformers), and a field
    with neither is refused naming it."""
    value = raw.get(key)
    if value is None:
        value = default
    if value is None:
        raise ModelLoadError(f"config.json: missing field {key!r}")
    return value


def init_from_scratch(model: nn.Module, norm_marker: str, std: float = 0.02, seed: int = 0) -> None:
    """Initialise a model trained from scratch: biases 0, norm weights (names containing
    `norm_marker`) 1, every other weight N(0, std^2) from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif norm_marker in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


class Linear(nn.Module):
    """y = x @ W.T + b with W stored [out, in], as nn.Linear checkpoints store it.

    GPT-2's Conv1D checkpoints store [in, out]; its loader transposes them once, because the
    [out, in] layout is the one CPU GEMM libraries run fastest: at 32 x 768 x 3072 it measured
    1.2x faster in fp32 and 18x in bf16 (on a CPU without AVX512-BF16) than x @ W[in, out].
    """

    def __init__(self, d_in: int, d_out: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)  # (T, d_out)

    def merged_weight(self, delta: Tensor) -> Tensor:
        """The weight with delta (d_out, d_in, fp32) added, in the weight's dtype."""
        return (self.weight.float() + delta).to(self.weight.dtype)  # (d_out, d_in)


def fuse_linears(mods: Sequence[Linear]) -> tuple[Tensor, Tensor | None]:
    """One [sum of d_out, d_in] weight (and bias) for projections of one input; each module's
    weight and bias become views of their row block, so a merge written into a module (in place)
    is what the fused GEMM multiplies. One GEMM instead of len(mods): in bf16 on the CPU,
    SmolLM's q/k/v took 74.5 us fused against 109.5 us as three (batch 32)."""
    weight = torch.cat([m.weight for m in mods])  # (sum d_out, d_in)
    biases = [m.bias for m in mods]
    bias = None if any(b is None for b in biases) else torch.cat(biases)  # type: ignore[arg-type]
    start = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start : start + n], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start : start + n], requires_grad=False)
        start += n
    return weight, bias


class Projection(Protocol):
    """An adaptable projection: its weight can take a merged dense update."""

    weight: nn.Parameter

    def merged_weight(self, delta: Tensor) -> Tensor:
        """The weight with delta (d_out, d_in, fp32) added, in the weight's own layout."""
        ...


class ModelSpec(Protocol):
    """What the engine reads from a family's frozen config (read-only: frozen dataclasses)."""

    @property
    def name(self) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def n_layer(self) -> int: ...

    @property
    def bos_token_id(self) -> int | None: ...


    @property
    def max_positions(self) -> int: ...

    @property
    def n_kv_head(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def d_ff(self) -> int: ...

    @property
    def layout(self) -> ModuleLayout: ...

    @property
    def attention_window(self) -> int | None:
        """A sliding attention window, if the checkpoint was trained with one."""
        ...

    def target_dims(self) -> Mapping[str, tuple[int, int]]:
        """(d_in, d_out) of every adapter target, in the layout's target order."""
        ...


class CausalLM(Protocol):
    """A family's model as the engine drives it (an nn.Module)."""

    @property
    def cfg(self) -> ModelSpec: ...

    def __call__(
        self,
        input_ids: Tensor,
        positions: Tensor,
        attn: AttnBatch | None = None,
        adapters: AdapterHook | None = None,
    ) -> Tensor:
        """Final hidden states (B, L, d), after the last norm."""
        ...

    def logits(self, hidden: Tensor) -> Tensor: ...

    def target(self, layer: int, target: int) -> Projection: ...

    def fuse_projections(self) -> None:
        """Serve projections of one input as one GEMM (after the weights are loaded)."""
        ...

    def base_gemms(self, layer: int) -> list[tuple[Tensor, Tensor | None]]:
        """The (weight [out, in], bias) of every projection GEMM a layer's forward runs."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...
