"""Per-step token->slot metadata, shared by every batched adapter op (LoRA and DEU alike).

One step's tokens each name an adapter slot (-1 = none). ``build_slot_meta`` does every
data-dependent step (sorting by slot, segmenting, tiling, host copies) once per engine step;
``per_token_meta`` builds the fixed-shape, device-only form a CUDA graph captures. Every layer's
``lora_apply`` and ``deu_apply`` then reads the same ``SlotMeta`` and does no sorting and no
host<->device syncs on its GPU path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from hotlora.kernels._common import MIN_DOT_BLOCK, next_pow2

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

# Tallest token tile of the Triton SGMV kernels (the shortest is MIN_DOT_BLOCK).
_MAX_BLOCK_M = 64


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
class SlotMeta:
    """Per-step token->slot metadata, built once per step and shared by every layer and by
    every adapter op that picks a per-token slot (LoRA's lora_apply and DEU's deu_apply).

    All tensors live on the step's device (build_slot_meta's are views into one buffer, so
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
    cpu_plan: CpuPlan  # LoRA's torch strategy when B is stored as (S, d_out, R)
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

    def with_cpu_plan(self, plan: CpuPlan) -> SlotMeta:
        """Copy that forces one torch strategy for every storage layout (tests, benchmarks)."""
        return dataclasses.replace(self, cpu_plan=plan, cpu_plan_rowwise=plan)


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


def build_slot_meta(
    token_slots: Tensor | Sequence[int],
    device: torch.device | str,
    row_widths: Sequence[int] = (),
) -> SlotMeta:
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
    block_m = min(_MAX_BLOCK_M, max(MIN_DOT_BLOCK, next_pow2(max_seg)))
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
    return SlotMeta(
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


def _empty_meta(ts: Tensor, device: torch.device | str) -> SlotMeta:
    """The meta of a step with no adapter token: its slots on the device and nothing else (the
    sorting and tiling of build_slot_meta would cost ~40 ops per step for no work)."""
    none = torch.empty(0, dtype=torch.long, device=device)
    return SlotMeta(
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
        block_m=MIN_DOT_BLOCK,
        cpu_plan="runs",
        cpu_plan_rowwise="runs",
        max_slot=-1,
    )


def per_token_meta(token_slots: Tensor, num_slots: int) -> SlotMeta:
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
    if token_slots.shape[0] > 1 and token_slots.stride(0) != 1:
        # The DEU kernel reads token_slots with unit stride, and launchers do not re-check.
        raise ValueError(f"token_slots must be contiguous, got stride {token_slots.stride()}")
    T, dev = token_slots.shape[0], token_slots.device
    tokens = torch.arange(T, device=dev)  # (T,)
    slots = token_slots.clamp(min=0)  # (T,): an empty tile's slot must still index memory
    ends = tokens + (token_slots >= 0)  # (T,): end == start for a token without an adapter
    return SlotMeta(
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
        block_m=MIN_DOT_BLOCK,
        cpu_plan="gathered",
        cpu_plan_rowwise="gathered",
        max_slot=num_slots - 1,
        per_token=True,
    )

