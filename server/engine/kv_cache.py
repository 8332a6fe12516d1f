"""A static KV cache: one preallocated row per running request (gpt-fast style)."""

from __future__ import annotations

import torch

from hotlora.server.engine.errors import EngineError
from hotlora.server.engine.models import ModelSpec


class KVCache:
    """Keys and values for `max_rows` requests of up to `max_seq_len` tokens each."""

    def __init__(
        self,
        cfg: ModelSpec,
        max_rows: int,
        max_seq_len: int,
        device: torch.device,
        dtype: torch.dtype,
        scratch: bool = False,
    ) -> None:
        # Only the KV heads are stored: grouped-query heads share them. With `scratch`, one more
        # row that is never handed out takes the writes of a fixed-shape step's padding rows.
        rows = max_rows + int(scratch)
        shape = (cfg.n_layer, rows, cfg.n_kv_head, max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (n_layer, rows, H_kv, S, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_rows, self.max_seq_len = max_rows, max_seq_len
        self.scratch_row = max_rows if scratch else None
        self._free = list(range(max_rows - 1, -1, -1))  # pop() hands out low rows first

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise EngineError("no free KV-cache row")
        return self._free.pop()

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row src into free row dst; src becomes free."""
        self._free.remove(dst)
        self.k[:, dst, :, :length].copy_(self.k[:, src, :, :length])
        self.v[:, dst, :, :length].copy_(self.v[:, src, :, :length])
        self.release(src)

    def release(self, row: int) -> None:
        # Stale keys need no clearing: the bias (a fixed-shape step's lengths) never lets a query
        # see positions it did not write.
        self._free.append(row)
        self._free.sort(reverse=True)
