"""The KV block pool's bookkeeping: allocation, references, the LRU free queue (a prefix's tail
evicted first), prefix-cache hits and eviction, reset."""

from __future__ import annotations

import random

import pytest

from hotlora.server.engine.block_pool import BlockPool, FreeBlockQueue, NoFreeBlocks
from hotlora.server.engine.prefix_hash import base_namespace, prompt_block_hashes


def ids(blocks: list) -> list[int]:  # type: ignore[type-arg]
    return [b.block_id for b in blocks]


def test_allocate_takes_from_the_head_and_release_returns_tail_first() -> None:
    pool = BlockPool(6)
    a = pool.allocate(3)
    assert ids(a) == [0, 1, 2] and all(b.ref_cnt == 1 for b in a)
    assert pool.num_free == 3 and pool.usage == pytest.approx(0.5)
    pool.release(a)
    # the request's last block is queued first: evicted before its parents
    assert pool.free.ids() == [3, 4, 5, 2, 1, 0]
    assert pool.num_free == 6 and pool.usage == 0.0


def test_asking_for_more_than_is_free_changes_nothing() -> None:
    pool = BlockPool(2)
    pool.allocate(1)
    with pytest.raises(NoFreeBlocks, match="2 KV blocks asked for, 1 free"):
        pool.allocate(2)
    assert pool.num_free == 1


def test_a_cached_prefix_is_found_taken_and_kept_from_eviction() -> None:
    pool = BlockPool(4)
    hashes = prompt_block_hashes(list(range(40)), 16, base_namespace(None))
    assert len(hashes) == 2
    first = pool.allocate(3)  # 2 full prompt blocks + the one holding the last tokens
    for block, h in zip(first, hashes, strict=False):
        pool.cache(block, h)
    pool.release(first)
    hit = pool.lookup(hashes)
    assert ids(hit) == [0, 1]
    pool.take(hit)
    assert all(b.ref_cnt == 1 for b in hit) and pool.num_free == 2
    # new data never takes a referenced block, cached or not
    assert set(ids(pool.allocate(2))).isdisjoint({0, 1})
    with pytest.raises(NoFreeBlocks):
        pool.allocate(1)


def test_eviction_forgets_the_hash_and_a_chain_misses_from_its_first_lost_block() -> None:
    pool = BlockPool(3)
    hashes = prompt_block_hashes(list(range(49)), 16, base_namespace(None))
    chain = pool.allocate(3)
    for block, h in zip(chain, hashes, strict=True):
        pool.cache(block, h)
    pool.release(chain)
    assert pool.num_cached == 3
    (evicted,) = pool.allocate(1)  # the chain's tail goes first
    assert evicted.block_id == 2 and evicted.block_hash is None and pool.num_cached == 2
    assert ids(pool.lookup(hashes)) == [0, 1]
    pool.release([evicted])  # uncached now: queued last, behind the chain's head
    assert pool.free.ids() == [1, 0, 2]
    pool.allocate(1)  # the chain's new tail
    assert ids(pool.lookup(hashes)) == [0]


def test_a_shared_block_is_freed_when_its_last_user_releases_it() -> None:
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.cache(block, b"h")
    pool.take(pool.lookup([b"h"]))
    assert block.ref_cnt == 2
    pool.release([block])
    assert pool.num_free == 1
    pool.release([block])
    assert pool.num_free == 2
    with pytest.raises(ValueError, match="released more often"):
        pool.release([block])


def test_the_same_hash_computed_twice_keeps_one_cached_copy() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, b"same")
    pool.cache(b, b"same")
    assert a.block_hash == b"same" and b.block_hash is None and pool.num_cached == 1
    assert pool.lookup([b"same"]) == [a]


def test_reset_forgets_every_cached_block_but_not_blocks_in_use() -> None:
    pool = BlockPool(3)
    used, idle = pool.allocate(1), pool.allocate(1)
    pool.cache(used[0], b"u")
    pool.cache(idle[0], b"i")
    pool.release(idle)
    assert pool.reset_cache() == 2
    assert pool.lookup([b"u"]) == [] and pool.lookup([b"i"]) == []
    assert used[0].ref_cnt == 1 and pool.num_free == 2


def test_caching_off_caches_nothing() -> None:
    pool = BlockPool(2, caching=False)
    (block,) = pool.allocate(1)
    pool.cache(block, b"h")
    assert pool.lookup([b"h"]) == [] and pool.num_cached == 0


def test_the_free_queue_matches_a_list_model_under_random_operations() -> None:
    rng = random.Random(0)
    pool = BlockPool(16)
    model = list(range(16))  # the free queue as a plain list, head first
    held: list[list] = []  # type: ignore[type-arg]
    for _ in range(2000):
        if held and (rng.random() < 0.5 or pool.num_free == 0):
            blocks = held.pop(rng.randrange(len(held)))
            pool.release(blocks)
            model += [b.block_id for b in reversed(blocks) if b.ref_cnt == 0]
        else:
            n = rng.randint(1, pool.num_free)
            blocks = pool.allocate(n)
            assert ids(blocks) == model[:n]
            del model[:n]
            held.append(blocks)
        assert pool.free.ids() == model and pool.num_free == len(model)


def test_a_free_queue_refuses_to_remove_a_block_it_does_not_hold() -> None:
    pool = BlockPool(1)
    (block,) = pool.allocate(1)
    with pytest.raises(ValueError, match="not in the free queue"):
        pool.free.remove(block)
    assert isinstance(pool.free, FreeBlockQueue)
    with pytest.raises(NoFreeBlocks):
        pool.free.popleft()


def test_a_pool_needs_a_block() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)
