"""Batched multi-adapter LoRA: public dispatch and per-step token->slot metadata.

The op, for every token t with k = token_slots[t] >= 0:

    y[t] += scales[k] * B[k] @ (A[k] @ x[t])

over stacked, zero-padded slot buffers A (S, R, d_in) and B (S, d_out, R). Tokens with
slot -1 are left bit-exactly untouched. ``build_lora_meta`` does every data-dependent step
(sorting, segmenting, tiling, host copies) once per engine step; ``lora_apply`` is then called
once per (layer, target) and does no sorting and no host<->device syncs on its GPU path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

CpuPlan = Literal["runs", "segments", "gathered"]

# Heuristic knobs for the torch path, set from load_tests/bench_kernels.py (fp32, GPT-2 shapes).
# "gathered" handles each token with its own slot's weights in a fixed ~8 ops per call, so it
# wins once there are enough distinct slots that per-slot matmul dispatch dominates. With B
# stored (S, d_out, R) it must copy one B slice per token, so it needs fewer tokens per slot to
# pay off than with B stored (S, R, d_out), where it copies nothing (embedding_bag).
_GATHER_MIN_SLOTS = 4
_GATHER_MAX_TOKENS_PER_SLOT = 2
_GATHER_MAX_TOKENS_PER_SLOT_ROWWISE = 4
# Bounds the per-call work of the gathered path, which grows with N, not with distinct slots.
_GATHER_MAX_TOKENS = 128

# Token-tile height of the Triton kernels; tl.dot on a real GPU needs every dim >= 16.
_MIN_BLOCK_M = 16
_MAX_BLOCK_M = 64

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class SlotRows:
    """Every active token's storage rows of a slot buffer with K rows per slot, flattened as
    embedding_bag takes them: bag n is rows[offsets[n] : offsets[n] + K] = slot_n * K + [0, K)."""

    rows: Tensor  # (N * K,) int64
    offsets: Tensor  # (N,) int64: n * K

    @staticmethod
    def of(slots: Tensor, K: int) -> SlotRows:
        """The rows of tokens whose slots are `slots` (N,)."""
        rows = torch.arange(K, device=slots.device) + slots.unsqueeze(1) * K  # (N, K)
        offsets = torch.arange(0, rows.numel(), K, device=slots.device)  # (N,)
        return SlotRows(rows.reshape(-1), offsets)


@dataclass(frozen=True)
class LoRAMeta:
    """Per-step token->slot metadata, built once per step and shared by every layer.

    All tensors live on the step's device (build_lora_meta's are views into one buffer, so
    building costs a single host->device copy; per_token_meta's are built on the device); the
    ``*_host`` tuples are the same data as Python ints so the CPU path
    never syncs and never re-reads device memory.
    """

    token_slots: Tensor  # (T,) int64, -1 = no adapter
    sorted_tokens: Tensor  # (N,) int64: tokens with slot >= 0, stably sorted by slot
    seg_slots: Tensor  # (G,) int64: distinct active slots, ascending
    seg_starts: Tensor  # (G+1,) int64: offsets into sorted_tokens
    seg_slots_host: tuple[int, ...]
    seg_starts_host: tuple[int, ...]
    # Active tokens in token order (for the gathered torch path, which needs no grouping).
    active_tokens: Tensor  # (N,) int64, ascending
    active_slots: Tensor  # (N,) int64: token_slots[active_tokens]
    # Maximal runs of consecutive tokens sharing one slot (prefill batches are mostly runs).
    run_slots_host: tuple[int, ...]
    run_starts_host: tuple[int, ...]
    run_ends_host: tuple[int, ...]
    # Triton launch map: one entry per BLOCK_M-high tile of a segment of sorted_tokens.
    tile_slots: Tensor  # (n_tiles,) int64: slot of each tile
    tile_starts: Tensor  # (n_tiles,) int64: first position in sorted_tokens
    tile_ends: Tensor  # (n_tiles,) int64: end of the tile's segment (rows >= end are masked)
    block_m: int
    cpu_plan: CpuPlan  # torch strategy when B is stored as (S, d_out, R)
    cpu_plan_rowwise: CpuPlan  # ... when B is stored as (S, R, d_out) (B[k, :, r] contiguous)
    max_slot: int  # largest active slot, -1 when empty (checked against S without a sync)
    # The gathered CPU path's storage rows per row width K the step's caller named (a
    # projection's d_in, the rank): built once per step, not once per call.
    gather_rows: Mapping[int, SlotRows] = dataclasses.field(default_factory=dict)
    # Built by per_token_meta: the slots are known on the device only, every token is its own
    # segment and tile (an empty one without an adapter), and the host fields are bounds.
    per_token: bool = False

    @property
    def empty(self) -> bool:
        """True when no token has an adapter (never known of a per-token meta)."""
        return not self.per_token and len(self.seg_slots_host) == 0

    @property
    def num_tokens(self) -> int:
        """T, the number of token rows the step's x / y must have."""
        return int(self.token_slots.shape[0])

    @property
    def num_active(self) -> int:
        """N, the number of tokens with an adapter (a per-token meta counts every token)."""
        return self.num_tokens if self.per_token else self.seg_starts_host[-1]

    @property
    def all_active(self) -> bool:
        """Every token has an adapter (the gathered path can then skip gather/scatter of rows)."""
        return not self.per_token and self.num_active == self.num_tokens

    @property
    def num_tiles(self) -> int:
        """Number of token tiles (grid axis 0 of the Triton kernels)."""
        return int(self.tile_slots.shape[0])

    def with_cpu_plan(self, plan: CpuPlan) -> LoRAMeta:
        """Copy that forces one torch strategy for every storage layout (tests, benchmarks)."""
        return dataclasses.replace(self, cpu_plan=plan, cpu_plan_rowwise=plan)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _choose_cpu_plan(n_active: int, n_segments: int, n_runs: int, rowwise: bool) -> CpuPlan:
    """Pick the torch strategy with the least overhead for this step's token pattern."""
    per_slot = _GATHER_MAX_TOKENS_PER_SLOT_ROWWISE if rowwise else _GATHER_MAX_TOKENS_PER_SLOT
    if (
        n_segments >= _GATHER_MIN_SLOTS
        and n_active <= per_slot * n_segments
        and n_active <= _GATHER_MAX_TOKENS
    ):
        return "gathered"
    # Runs need no row gather/scatter (2 ops per run); segments pay 3 fixed ops to group rows.
    if n_runs <= n_segments + 1:
        return "runs"
    return "segments"


def build_lora_meta(
    token_slots: Tensor | Sequence[int],
    device: torch.device | str,
    row_widths: Sequence[int] = (),
) -> LoRAMeta:
    """Sort tokens by slot and build segment, run and tile maps: sorted_tokens = argsort(slots).

    ``token_slots`` holds one slot id per token (-1 = no adapter). A device tensor costs one
    device->host copy; everything is computed on the host and shipped in one host->device copy.
    ``row_widths``: the d_in and R of the weights this step will use; when the CPU path will
    gather, their row indices are built here once for every layer.
    """
    if isinstance(token_slots, Tensor):
        if token_slots.dim() != 1:
            raise ValueError(f"token_slots must be 1-D, got shape {tuple(token_slots.shape)}")
        if token_slots.dtype.is_floating_point or token_slots.dtype == torch.bool:
            raise TypeError(f"token_slots must be an integer tensor, got {token_slots.dtype}")
        ts = token_slots.detach().to(device="cpu", dtype=torch.long)  # (T,)
    else:
        ts = torch.tensor(list(token_slots), dtype=torch.long)  # (T,)
        if ts.dim() != 1:
            raise ValueError("token_slots must be a flat sequence of ints")
    if ts.numel() and int(ts.min()) < -1:
        raise ValueError(f"token_slots must be >= -1 (-1 = no adapter), got {int(ts.min())}")
    if ts.numel() == 0 or int(ts.max()) < 0:
        return _empty_meta(ts, device)

    active = ts >= 0  # (T,)
    active_tokens = torch.nonzero(active).squeeze(1)  # (N,)
    active_slots = ts[active_tokens]  # (N,)
    order = torch.argsort(active_slots, stable=True)  # (N,)
    sorted_tokens = active_tokens[order]  # (N,)
    seg_slots, counts = torch.unique_consecutive(active_slots[order], return_counts=True)  # (G,)
    seg_starts = torch.zeros(seg_slots.numel() + 1, dtype=torch.long)  # (G+1,)
    torch.cumsum(counts, 0, out=seg_starts[1:])

    # Runs: active token whose neighbour differs (or is -1 / the edge) opens / closes a run.
    differs = ts[1:] != ts[:-1]  # (T-1,)
    edge = torch.ones(1, dtype=torch.bool)
    run_first = active & torch.cat([edge, differs])  # (T,)
    run_last = active & torch.cat([differs, edge])  # (T,)
    run_starts = torch.nonzero(run_first).squeeze(1)  # (n_runs,)
    run_ends = torch.nonzero(run_last).squeeze(1) + 1  # (n_runs,)

    # Tall tiles re-read each A/B tile fewer times; short ones waste less on 1-token segments.
    max_seg = int(counts.max()) if counts.numel() else 0
    block_m = min(_MAX_BLOCK_M, max(_MIN_BLOCK_M, _next_pow2(max_seg)))
    tiles_per_seg = (counts + block_m - 1) // block_m  # (G,)
    tile_seg = torch.repeat_interleave(torch.arange(seg_slots.numel()), tiles_per_seg)  # (n_tiles,)
    first_tile = torch.cumsum(tiles_per_seg, 0) - tiles_per_seg  # (G,)
    tile_local = torch.arange(tile_seg.numel()) - first_tile[tile_seg]  # (n_tiles,)
    tile_starts = seg_starts[tile_seg] + tile_local * block_m  # (n_tiles,)
    tile_ends = seg_starts[tile_seg + 1]  # (n_tiles,)
    tile_slots = seg_slots[tile_seg]  # (n_tiles,)

    parts = [
        ts,
        sorted_tokens,
        seg_slots,
        seg_starts,
        active_tokens,
        active_slots,
        tile_slots,
        tile_starts,
        tile_ends,
    ]
    packed = torch.cat(parts).to(device)  # one host->device copy for the whole step
    views = torch.split(packed, [p.numel() for p in parts])

    seg_slots_host = tuple(seg_slots.tolist())
    seg_starts_host = tuple(seg_starts.tolist())
    run_starts_host = tuple(run_starts.tolist())
    counts_host = (seg_starts_host[-1], len(seg_slots_host), len(run_starts_host))
    plan_rowwise = _choose_cpu_plan(*counts_host, rowwise=True)
    gather_rows = {}
    if plan_rowwise == "gathered" and torch.device(device).type == "cpu":
        gather_rows = {k: SlotRows.of(active_slots, k) for k in row_widths}
    return LoRAMeta(
        token_slots=views[0],
        sorted_tokens=views[1],
        seg_slots=views[2],
        seg_starts=views[3],
        seg_slots_host=seg_slots_host,
        seg_starts_host=seg_starts_host,
        active_tokens=views[4],
        active_slots=views[5],
        run_slots_host=tuple(ts[run_starts].tolist()),
        run_starts_host=run_starts_host,
        run_ends_host=tuple(run_ends.tolist()),
        tile_slots=views[6],
        tile_starts=views[7],
        tile_ends=views[8],
        block_m=block_m,
        cpu_plan=_choose_cpu_plan(*counts_host, rowwise=False),
        cpu_plan_rowwise=plan_rowwise,
        max_slot=seg_slots_host[-1] if seg_slots_host else -1,
        gather_rows=gather_rows,
    )


def _empty_meta(ts: Tensor, device: torch.device | str) -> LoRAMeta:
    """The meta of a step with no adapter token: its slots on the device and nothing else (the
    sorting and tiling of build_lora_meta would cost ~40 ops per step for no work)."""
    none = torch.empty(0, dtype=torch.long, device=device)
    return LoRAMeta(
        token_slots=ts.to(device),
        sorted_tokens=none,
        seg_slots=none,
        seg_starts=torch.zeros(1, dtype=torch.long, device=device),
        seg_slots_host=(),
        seg_starts_host=(0,),
        active_tokens=none,
        active_slots=none,
        run_slots_host=(),
        run_starts_host=(),
        run_ends_host=(),
        tile_slots=none,
        tile_starts=none,
        tile_ends=none,
        block_m=_MIN_BLOCK_M,
        cpu_plan="runs",
        cpu_plan_rowwise="runs",
        max_slot=-1,
    )


def per_token_meta(token_slots: Tensor, num_slots: int) -> LoRAMeta:
    """The meta of a fixed-shape step whose slots live on the device only: tile t = token t.

    Built from `token_slots` (T,) int64 with device ops alone (no sync, no data-dependent
    shape), so a CUDA graph can capture the building and every layer's kernels once and replay
    them for any slots written into the same buffer. The kernels' grids then depend on T only;
    a token without an adapter owns an empty tile (never written). `num_slots`: the S of the
    slot buffers, the host's bound on every slot.
    """
    if token_slots.dim() != 1 or token_slots.dtype != torch.long:
        raise TypeError(
            f"token_slots must be 1-D int64, got {token_slots.dtype} {tuple(token_slots.shape)}"
        )
    T, dev = token_slots.shape[0], token_slots.device
    tokens = torch.arange(T, device=dev)  # (T,)
    slots = token_slots.clamp(min=0)  # (T,): an empty tile's slot must still index memory
    ends = tokens + (token_slots >= 0)  # (T,): end == start for a token without an adapter
    return LoRAMeta(
        token_slots=token_slots,
        sorted_tokens=tokens,
        seg_slots=slots,
        seg_starts=torch.arange(T + 1, device=dev),
        seg_slots_host=(),
        seg_starts_host=(0,),
        active_tokens=tokens,
        active_slots=slots,
        run_slots_host=(),
        run_starts_host=(),
        run_ends_host=(),
        tile_slots=slots,
        tile_starts=tokens,
        tile_ends=ends,
        block_m=_MIN_BLOCK_M,
        cpu_plan="gathered",
        cpu_plan_rowwise="gathered",
        max_slot=num_slots - 1,
        per_token=True,
    )


def check_lora_args(
    y: Tensor, x: Tensor, A: Tensor, B: Tensor, scales: Tensor, meta: LoRAMeta
) -> None:
    """Raise TypeError / ValueError unless the shapes, dtypes and devices fit y += s*(x A^T) B^T."""
    for name, t in (("y", y), ("x", x), ("A", A), ("B", B), ("scales", scales)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or y.dim() != 2 or A.dim() != 3 or B.dim() != 3 or scales.dim() != 1:
        raise ValueError(
            "expected y (T, d_out), x (T, d_in), A (S, R, d_in), B (S, d_out, R), scales (S,); "
            f"got y {tuple(y.shape)}, x {tuple(x.shape)}, A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}, scales {tuple(scales.shape)}"
        )
    T, d_in = x.shape
    S, R, _ = A.shape
    d_out = y.shape[1]
    if (
        y.shape[0] != T
        or meta.num_tokens != T
        or A.shape[2] != d_in
        or B.shape != (S, d_out, R)
        or scales.shape[0] != S
    ):
        raise ValueError(
            f"shape mismatch: meta has T={meta.num_tokens}, y {tuple(y.shape)}, "
            f"x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)} "
            f"(want (S={S}, d_out={d_out}, R={R})), scales {tuple(scales.shape)}"
        )
    if meta.max_slot >= S:
        raise ValueError(f"token slot {meta.max_slot} out of range for S={S} slots")
    dtype = x.dtype
    if not dtype.is_floating_point:
        raise TypeError(f"x must be floating point, got {dtype}")
    # CPU half activations may come with float32 weights: the torch path computes in fp32.
    w_dtypes = (dtype, torch.float32) if dtype in _HALF_DTYPES and x.device.type == "cpu" else (
        dtype,
    )
    if y.dtype != dtype or A.dtype != B.dtype or A.dtype not in w_dtypes:
        raise TypeError(
            f"x, y, A, B must share one dtype (A and B may be float32 for CPU half x), got "
            f"x {dtype}, y {y.dtype}, A {A.dtype}, B {B.dtype}"
        )
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    dev = x.device
    if (
        y.device != dev
        or A.device != dev
        or B.device != dev
        or scales.device != dev
        or meta.token_slots.device != dev
    ):
        raise ValueError(
            f"all tensors must be on one device: x {dev}, y {y.device}, A {A.device}, "
            f"B {B.device}, scales {scales.device}, meta {meta.token_slots.device}"
        )
    if (d_out > 1 and y.stride(1) != 1) or (d_in > 1 and x.stride(1) != 1):
        raise ValueError(
            f"y and x need a contiguous last dim, got strides y {y.stride()}, x {x.stride()}"
        )


def lora_apply(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scales: Tensor, meta: LoRAMeta) -> None:
    """In place: y[t] += scales[k] * B[k] @ (A[k] @ x[t]) for k = token_slots[t] >= 0.

    y (T, d_out), x (T, d_in), A (S, R, d_in), B (S, d_out, R), scales (S,) float32.
    CUDA fp16/bf16/fp32 runs the Triton SGMV kernels; everything else the torch path, in the
    weights' dtype: half weights with half x run in half (each product accumulates in fp32
    inside its kernel and rounds to half, as the Triton expand's tl.dot does), float32 weights
    with half x in float32, their delta rounded once into y.
    """
    check_lora_args(y, x, A, B, scales, meta)
    if meta.empty:
        return
    if x.is_cuda and x.dtype in _TRITON_DTYPES:
        # Imported here so CPU-only use of this module never imports triton.
        from kernels.triton_lora import sgmv_expand, sgmv_shrink

        sgmv_expand(y, sgmv_shrink(x, A, meta), B, scales, meta)
        return
    if A.dtype != x.dtype:  # float32 weights, half x (CPU): only x is converted per call
        # Every path adds its fp32 delta into the half y in one op that rounds once, as
        # converting y, adding and converting back would, without the two whole-y copies.
        # Rows without an adapter are never written.
        _torch_apply(y, x.float(), A, B, scales, meta)
        return
    _torch_apply(y, x, A, B, scales, meta)


def _torch_apply(
    y: Tensor, x: Tensor, A: Tensor, B: Tensor, scales: Tensor, meta: LoRAMeta
) -> None:
    """Dispatch to the strategy build_lora_meta picked: y[t] += s[k] B[k] A[k] x[t]."""
    if meta.per_token:
        _apply_per_token(y, x, A, B, scales, meta)
        return
    plan = meta.cpu_plan_rowwise if _rows_contiguous(B) else meta.cpu_plan
    if plan == "gathered":
        _apply_gathered(y, x, A, B, scales, meta)
    elif plan == "runs":
        _apply_runs(y, x, A, B, scales, meta)
    else:
        _apply_segments(y, x, A, B, scales, meta)


def _apply_runs(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scales: Tensor, meta: LoRAMeta) -> None:
    """Per run [a, b) of slot k: y[a:b] += s[k] * (x[a:b] A[k]^T) B[k]^T, in place on y's rows."""
    # One host read of all scales (a sync only on the CUDA fp64 fallback); each then rides in
    # addmm's alpha instead of costing a separate scaling op.
    sc = scales.tolist()
    for k, a, b in zip(meta.run_slots_host, meta.run_starts_host, meta.run_ends_host, strict=True):
        h = torch.mm(x[a:b], A[k].t())  # (n, R)
        if y.dtype == h.dtype:
            y[a:b].addmm_(h, B[k].t(), alpha=sc[k])
        else:  # a half y: add the fp32 delta, rounding once
            y[a:b].add_(torch.mm(h, B[k].t()), alpha=sc[k])


def _apply_segments(
    y: Tensor, x: Tensor, A: Tensor, B: Tensor, scales: Tensor, meta: LoRAMeta
) -> None:
    """Group rows by slot: delta[seg] = s[k] * (x[seg] A[k]^T) B[k]^T, then y.index_add_(delta)."""
    n = meta.num_active
    xs = x.index_select(0, meta.sorted_tokens)  # (N, d_in)
    h = torch.empty((n, A.shape[1]), dtype=x.dtype, device=x.device)  # (N, R)
    delta = torch.empty((n, y.shape[1]), dtype=x.dtype, device=y.device)  # (N, d_out)
    sc = scales.tolist()
    st = meta.seg_starts_host
    for i, k in enumerate(meta.seg_slots_host):
        a, b = st[i], st[i + 1]
        torch.mm(xs[a:b], A[k].t(), out=h[a:b])
        # beta=0 ignores the (uninitialised) input, so this is delta = s * h @ B^T in one op.
        torch.addmm(delta[a:b], h[a:b], B[k].t(), beta=0, alpha=sc[k], out=delta[a:b])
    add_rows(y, meta.sorted_tokens, delta)


def _rows_contiguous(W: Tensor) -> bool:
    """W (S, m, n) is stored as (S, n, m): W[k, :, j] is one contiguous row of the storage."""
    return W.transpose(1, 2).is_contiguous()


def _apply_gathered(
    y: Tensor, x: Tensor, A: Tensor, B: Tensor, scales: Tensor, meta: LoRAMeta
) -> None:
    """Per-token weights, batched: h[t] = s[k_t] * A[k_t] x[t]; y[t] += B[k_t] h[t].

    When a weight is stored transposed (A as (S, d_in, R), B as (S, R, d_out)), its product is
    one embedding_bag over the storage rows: a weighted row sum that reads each needed row once
    and copies nothing. Otherwise the token's slices are gathered (one copy) for a batched GEMV.
    """
    slots = meta.active_slots  # (N,)
    xs = x if meta.all_active else x.index_select(0, meta.active_tokens)  # (N, d_in)
    h = _slot_matvec(xs, A, slots, meta.gather_rows)  # (N, R)
    h.mul_(scales.index_select(0, slots).unsqueeze(1))
    delta = _slot_matvec(h, B, slots, meta.gather_rows)  # (N, d_out)
    if meta.all_active:
        y.add_(delta)  # a half y with fp32 weights takes the fp32 delta, rounding once
    else:
        add_rows(y, meta.active_tokens, delta)


def _apply_per_token(
    y: Tensor, x: Tensor, A: Tensor, B: Tensor, scales: Tensor, meta: LoRAMeta
) -> None:
    """The gathered math over every token, its slot only on the device: rows without an
    adapter compute with slot 0 and scale 0, and keep their own bits through a select."""
    slots, active = meta.active_slots, meta.token_slots >= 0  # (T,), (T,)
    h = _slot_matvec(x, A, slots, {})  # (T, R)
    h.mul_((scales.index_select(0, slots) * active).unsqueeze(1))
    delta = _slot_matvec(h, B, slots, {})  # (T, d_out)
    y.copy_(torch.where(active.unsqueeze(1), y + delta, y))


def add_rows(y: Tensor, tokens: Tensor, delta: Tensor) -> None:
    """y[tokens] += delta for distinct tokens; a half y adds an fp32 delta, rounding once."""
    if delta.dtype == y.dtype:
        y.index_add_(0, tokens, delta)
        return
    rows = y.index_select(0, tokens)  # (N, d_out)
    rows.add_(delta)
    y.index_copy_(0, tokens, rows)


def _slot_matvec(
    v: Tensor, W: Tensor, slots: Tensor, rows_by_width: Mapping[int, SlotRows]
) -> Tensor:
    """out[n] = W[slots[n]] @ v[n] for v (N, K), W (S, M, K): one call, no loop over tokens."""
    S, M, K = W.shape
    if _rows_contiguous(W):
        bags = rows_by_width.get(K) or SlotRows.of(slots, K)
        # torch.embedding_bag itself: F.embedding_bag's argument checks and 2-D reshaping cost
        # ~11 us per call here (17.9 vs 7.1 us at tiny shapes), twice in every gathered call.
        out, *_ = torch.embedding_bag(
            W.transpose(1, 2).reshape(S * K, M),  # (S * K, M), a view
            bags.rows,
            bags.offsets,
            False,  # scale_grad_by_freq
            0,  # mode: sum
            False,  # sparse
            v.reshape(-1),  # per-sample weights (N * K,)
            False,  # include_last_offset
        )
        return out  # (N, M)
    # Row-vector bmm ((N,1,K) @ (N,K,M)) maps to fast GEMV kernels; the column-vector form
    # ((N,M,K) @ (N,K,1)) measured ~2x slower on CPU.
    w_tok = W.index_select(0, slots)  # (N, M, K)
    return torch.bmm(v.unsqueeze(1), w_tok.transpose(1, 2)).squeeze(1)  # (N, M)
