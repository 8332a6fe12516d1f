"""The KV block pool: every block created once, handed out and taken back by id, and the
prefix cache's hash -> block map (vLLM V1's BlockPool, in the engine core's bookkeeping).

A block is `block_size` token positions of every layer's keys and values; this module only
counts and names them (the tensors are the KV cache's). A block is in use while a request
holds it (`ref_cnt` > 0). A full block of a prompt may also be *cached*: it carries the hash of
its tokens and their whole prefix (server/engine/prefix_hash.py), and a later request with the
same prefix takes it instead of computing it again. An unreferenced cached block stays
reusable until it is needed for new data: free blocks wait in one LRU queue, and taking a cached
one from its head evicts it (its hash is forgotten).

A request frees its blocks tail first, so within a prefix chain the last block is evicted
before its parents: a chain that lost its tail still serves its head, one that lost its head
would serve nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hotlora.server.engine.errors import EngineError


class NoFreeBlocks(EngineError):
    """More blocks were asked for than are free (the scheduler checks `num_free` first)."""


@dataclass(eq=False)
class Block:
    """One block of the pool. `prev`/`next` link it into the free queue while it is free."""

    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set while the block is in the prefix cache
    prev: Block | None = None
    next: Block | None = None


class FreeBlockQueue:
    """The free blocks in eviction order, a doubly linked list threaded through the blocks
    themselves: taking a cached block back from the middle (a prefix hit) is O(1), and the
    queue never allocates."""

    def __init__(self, blocks: Sequence[Block]) -> None:
        self._head = Block(-1)  # sentinels: no end needs a special case
        self._tail = Block(-1)
        self._head.next, self._tail.prev = self._tail, self._head
        self.size = 0
        for block in blocks:
            self.append(block)

    def append(self, block: Block) -> None:
        """Put `block` last: it is evicted after every block already queued."""
        last = self._tail.prev
        assert last is not None and block.prev is None and block.next is None
        last.next, block.prev = block, last
        block.next, self._tail.prev = self._tail, block
        self.size += 1

    def popleft(self) -> Block:
        block = self._head.next
        if block is None or block is self._tail:
            raise NoFreeBlocks("no free KV block")
        self.remove(block)
        return block

    def remove(self, block: Block) -> None:
        prev, nxt = block.prev, block.next
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next, nxt.prev = nxt, prev
        block.prev = block.next = None
        self.size -= 1

    def ids(self) -> list[int]:
        """The queued block ids, head (next evicted) first: for tests and debugging."""
        out, block = [], self._head.next
        while block is not None and block is not self._tail:
            out.append(block.block_id)
            block = block.next
        return out


class BlockPool:
    """`num_blocks` blocks, their free queue and the prefix cache's hash -> block map."""

    def __init__(self, num_blocks: int, caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free = FreeBlockQueue(self.blocks)
        self.caching = caching
        self._cached: dict[bytes, Block] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (cached but unreferenced ones included)."""
        return self.free.size

    @property
    def usage(self) -> float:
        """Blocks in use / blocks (hotlora_kv_cache_usage_perc): cached free blocks count as
        free, since any request may take them."""
        return 1.0 - self.free.size / len(self.blocks)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def allocate(self, n: int) -> list[Block]:
        """`n` blocks for new data, each with ref_cnt 1; cached ones among them are evicted."""
        if n > self.free.size:
            raise NoFreeBlocks(f"{n} KV blocks asked for, {self.free.size} free")
        out = []
        for _ in range(n):
            block = self.free.popleft()
            self._forget(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def lookup(self, hashes: Iterable[bytes]) -> list[Block]:
        """The cached blocks of the longest prefix of `hashes` (a chain: block i's hash covers
        blocks 0..i, so the first miss ends the hit). Takes no reference: see `take`."""
        hit = []
        if self.caching:
            for h in hashes:
                block = self._cached.get(h)
                if block is None:
                    break
                hit.append(block)
        return hit

    def take(self, blocks: Iterable[Block]) -> None:
        """A request starts using cached blocks (a prefix hit): one more reference each; an
        unreferenced one leaves the free queue, so nothing evicts it while it is used."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free.remove(block)
            block.ref_cnt += 1

    def cache(self, block: Block, block_hash: bytes) -> None:
        """A full block's tokens are computed: later prompts with its prefix may take it. When
        another block already holds that hash (two requests computed the same prefix at once),
        that one stays the cached copy and this one is freed as uncached data later."""
        if not self.caching or block.block_hash is not None:
            return
        if block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def release(self, blocks: Sequence[Block]) -> None:
        """A request is done with `blocks` (in its order): one reference less each; those no
        one uses go to the end of the free queue, tail first, so a prefix's end is evicted
        before its start."""
        for block in reversed(blocks):
            if block.ref_cnt < 1:
                raise ValueError(f"block {block.block_id} released more often than taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free.append(block)

    def reset_cache(self) -> int:
        """Forget every cached block (POST /reset_prefix_cache); blocks in use keep their data
        for the requests that hold them. Returns how many were forgotten."""
        dropped = len(self._cached)
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        return dropped

    def _forget(self, block: Block) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
