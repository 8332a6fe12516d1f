"""Decode steps replayed from CUDA graphs, one set per batch-size bucket (as vLLM and gpt-fast).

A decode step of a small model on a GPU costs more in kernel launches (~20 a layer, a few us
each) than in arithmetic; a graph launches a whole step at once. A graph replays fixed
addresses and shapes, so every bucket reads one static int64 block that each step is copied
into with one host->device copy, and everything the step derives from it is built from device
ops inside the graph: the per-token adapter metas (kernels.per_token_meta), the KV-cache
write index, and attention that reads the cache by row and length (kernels.decode_attention).
A batch smaller than its bucket is padded with rows that write the KV cache's scratch row and
whose logits are dropped.

Graphs are keyed by (bucket, which adapter ops run) and captured on first use. Prefill, and a
decode step no bucket holds, run eagerly. Everything a graph reads is updated in place: slot
buffers, and merged weights (Residents.merge copies into the base weights), so no graph goes
stale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from hotlora.kernels import SlotMeta, build_slot_meta, per_token_meta
from hotlora.server.engine.errors import EngineError
from hotlora.server.engine.hook import BatchAdapters
from hotlora.server.engine.kv_cache import KVCache
from hotlora.server.engine.models import AttnBatch, CausalLM
from hotlora.server.engine.residents import Residents

log = logging.getLogger(__name__)

# Records fn (run once or more) and returns what replays it and yields its output tensor.
Capture = Callable[[Callable[[], Tensor]], Callable[[], Tensor]]
# (plus LoRA, minus LoRA of a merged adapter, DEU): the adapter ops a graph runs.
Variant = tuple[bool, bool, bool]

_IDS, _POSITIONS, _ROWS, _PLUS, _MINUS, _DEU = range(6)  # rows of the static block
_WARMUP_RUNS = 2


def cuda_capture(device: torch.device) -> Capture:
    """Capture on `device`, every graph in one shared memory pool (graphs are replayed one at a
    time, and a step's logits are read before the next replay)."""
    with torch.cuda.device(device):
        pool = torch.cuda.graph_pool_handle()

    def capture(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
        with torch.cuda.device(device):
            # Warm up on a side stream: Triton compiles and cuBLAS picks its kernels there, so
            # the capture records launches only.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(_WARMUP_RUNS):
                    fn()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = fn()

        def replay() -> Tensor:
            graph.replay()
            return out

        return replay

    return capture


def replay_by_calling(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """A capture without a GPU: run the step once (as a capture's warm-up would, on an all-padding
    block) and replay it by calling it again. It reads the same static block a CUDA graph would,
    so the graph path runs, and is tested, on the CPU."""
    fn()
    return fn


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below max_batch, and max_batch: a step pads to the smallest that holds it."""
    sizes = {max_batch}
    b = 1
    while b < max_batch:
        sizes.add(b)
        b *= 2
    return tuple(sorted(sizes))


class DecodeGraphs:
    """Captured decode steps of one model over one KV cache and one set of adapter slots."""

    def __init__(
        self,
        model: CausalLM,
        kv: KVCache,
        residents: Residents,
        max_batch: int,
        device: torch.device,
        capture: Capture,
    ) -> None:
        if kv.scratch_row is None:
            raise EngineError("CUDA graphs need a KV cache with a scratch row")
        self.model, self.kv, self.residents = model, kv, residents
        self._scratch_row: int = kv.scratch_row
        self.buckets = batch_buckets(max_batch)
        self._capture = capture
        # None: that capture failed, and its steps run eagerly.
        self._graphs: dict[tuple[int, Variant], Callable[[], Tensor] | None] = {}
        n = 6 * self.buckets[-1]
        # The block the graphs read, and its host staging copy (pinned on CUDA): a bucket of
        # size b uses the first 6 * b elements as one contiguous (6, b) block, so its copy is
        # one DMA the host does not wait for.
        self._static = torch.zeros(n, dtype=torch.long, device=device)  # (6 * B_max,)
        self._host = torch.zeros(n, dtype=torch.long, pin_memory=device.type == "cuda")
        # Marks the staging copy's end: the host buffer is not rewritten before it.
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self._heads = torch.arange(kv.k.shape[2], device=device)  # (H_kv,)
        self._no_lora = build_slot_meta([], device)  # built here: capture copies nothing in
        self.captures = self.replays = 0

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def decode(
        self,
        rows: Sequence[int],
        tokens: Sequence[int],
        starts: Sequence[int],
        plus: Sequence[int],
        minus: Sequence[int] | None,
        deu: Sequence[int],
    ) -> Tensor | None:
        """Logits (B, V) of one decode step, or None when no bucket holds it (run it eagerly).

        Row b feeds tokens[b] at position starts[b] of cache row rows[b] with LoRA slot plus[b],
        the merged adapter's slot minus[b] (None: no merged adapter) and DEU slot deu[b].
        """
        B = len(rows)
        size = self.bucket(B)
        if size is None or B == 0:
            return None
        if max(starts) >= self.kv.max_seq_len:
            raise EngineError(
                f"positions reach {max(starts)}, past the KV cache's {self.kv.max_seq_len}"
            )
        variant = (any(s >= 0 for s in plus), minus is not None, any(s >= 0 for s in deu))
        key = (size, variant)
        if key in self._graphs and self._graphs[key] is None:
            return None
        if self._copied is not None:
            self._copied.synchronize()
        host = self._host[: 6 * size].view(6, size)
        # One tensor from one nested list, its rows in the block's order (_IDS ... _DEU).
        no_minus = [-1] * B
        host[:, :B] = torch.tensor(
            [tokens, starts, rows, plus, no_minus if minus is None else minus, deu]
        )
        self._pad(host, B)
        self._block(size).copy_(host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        replay = self._graphs[key] if key in self._graphs else self._record(size, variant)
        if replay is None:
            return None
        self.replays += 1
        return replay()[:B]

    def _block(self, size: int) -> Tensor:
        return self._static[: 6 * size].view(6, size)  # (6, size)

    def _pad(self, host: Tensor, B: int) -> None:
        """Rows past B: token 0 at position 0 of the scratch row, no adapter."""
        host[:, B:] = -1
        host[_IDS, B:] = 0
        host[_POSITIONS, B:] = 0
        host[_ROWS, B:] = self._scratch_row

    def _record(self, size: int, variant: Variant) -> Callable[[], Tensor] | None:
        """Capture (size, variant); None if that fails (then its steps run eagerly)."""
        # Capturing runs the step on what the block holds: make all of it padding, so those
        # runs write the scratch row only, whatever the rows of the step that asked for it.
        block = self._block(size)
        saved = block.clone()
        pad = torch.empty(6, size, dtype=torch.long)
        self._pad(pad, 0)
        block.copy_(pad)
        replay: Callable[[], Tensor] | None = None
        try:
            replay = self._capture(lambda: self._step(size, variant))
            self.captures += 1
            log.info("captured a decode graph: batch %d, adapters %s", size, variant)
        except (RuntimeError, ValueError, TypeError) as e:  # serve eagerly rather than fail
            log.warning(
                "decode graph for batch %d, adapters %s not captured (%s): those steps run eagerly",
                size,
                variant,
                e,
            )
        finally:
            block.copy_(saved)
        self._graphs[(size, variant)] = replay
        return replay

    def _step(self, size: int, variant: Variant) -> Tensor:
        """The step as device ops on the static block: logits (size, V)."""
        block = self._block(size)
        ids, positions, rows = block[_IDS], block[_POSITIONS], block[_ROWS]  # (size,) each
        kv = self.kv
        S = kv.max_seq_len
        kv_index = (rows[:, None] * self._heads.numel() + self._heads) * S + positions[:, None]
        attn = AttnBatch(
            k_cache=kv.k,
            v_cache=kv.v,
            rows=rows,
            row_range=None,
            positions=positions[:, None],  # (size, 1)
            kv_index=kv_index[:, None],  # (size, 1, H_kv)
            bias=None,
            s_used=S,  # the rope table Llama looks up then spans the whole cache: never regrown
            lengths=positions + 1,
        )
        hidden = self.model(ids[:, None], positions[:, None], attn, self._hook(block, variant))
        return self.model.logits(hidden[:, 0])  # (size, V)

    def _hook(self, block: Tensor, variant: Variant) -> BatchAdapters | None:
        if not any(variant):
            return None
        r = self.residents
        plus, minus, deu = variant
        n_lora, n_deu = r.lora.max_slots, r.deu.bank.shape[2]

        def meta(on: bool, row: int, n: int) -> SlotMeta:
            return per_token_meta(block[row], n) if on else self._no_lora

        return BatchAdapters(
            r.lora,
            r.deu,
            meta(plus, _PLUS, n_lora),
            meta(minus, _MINUS, n_lora) if minus else None,
            meta(deu, _DEU, n_deu),
        )
