"""RadixCache on its own: matching, splitting, ownership of slots, locks, LRU eviction, reset."""

from __future__ import annotations

import random
from typing import Dict, List, Tuple

import numpy as np
import pytest

from pymllm.mem_cache import KVAllocationError, TokenToKVPoolAllocator
from pymllm.mem_cache.radix_cache import RadixCache


def make(size: int = 64) -> Tuple[TokenToKVPoolAllocator, RadixCache]:
    alloc = TokenToKVPoolAllocator(size)
    return alloc, RadixCache(alloc)


def finish(cache: RadixCache, key: List[int], reused: int = 0) -> np.ndarray:
    """A request that reused `reused` cached slots of `key` and computed the rest, then finished."""
    match = cache.match_prefix(key)
    cache.lock(match.handle)
    own = cache.allocator.alloc(len(key) - reused)
    slots = np.concatenate([match.slots[:reused], own])
    cache.cache_finished_req(key, slots, match.handle)
    return slots


def check(cache: RadixCache) -> None:
    cache.allocator.check_invariants()
    cache.check_invariants()
    # No slot is both cached and free (the allocator's in-use map is the ground truth).
    assert cache.allocator._in_use[cache.cached_slots()].all()


def test_empty_cache_matches_nothing():
    alloc, cache = make()
    match = cache.match_prefix([1, 2, 3])
    assert match.slots.size == 0
    cache.lock(match.handle)
    assert cache.evictable_size() == 0 and cache.total_cached() == 0
    cache.unlock(match.handle)
    check(cache)


def test_longest_prefix_and_split_mid_edge():
    alloc, cache = make()
    slots = finish(cache, [1, 2, 3, 4])
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots.tolist() == slots.tolist()
    assert cache.match_prefix([9, 1]).slots.size == 0
    # The match ends inside the edge [1, 2, 3, 4]: the edge is split and the handle ends at [1, 2].
    match = cache.match_prefix([1, 2, 7])
    assert match.slots.tolist() == slots[:2].tolist()
    cache.lock(match.handle)
    assert (cache.evictable_size(), cache.total_cached()) == (2, 4)
    check(cache)
    # The tail [3, 4] is an unlocked leaf; the locked head survives any eviction.
    assert cache.evict(100) == 2
    assert cache.match_prefix([1, 2, 3, 4]).slots.tolist() == slots[:2].tolist()
    cache.unlock(match.handle)
    assert cache.evictable_size() == 2
    check(cache)


def test_already_cached_part_is_shared_and_duplicates_are_freed():
    alloc, cache = make()
    first = finish(cache, [1, 2, 3, 4])
    # Admitted before the entry existed: computed all six positions itself.
    second = alloc.alloc(6)
    cache.cache_finished_req([1, 2, 3, 4, 5, 6], second, cache.match_prefix([]).handle)
    assert cache.total_cached() == 6 and alloc.used_size() == 6
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).slots.tolist() == first.tolist() + second[4:].tolist()
    assert not alloc._in_use[second[:4]].any(), "duplicate slots go back to the allocator"
    check(cache)


def test_reused_prefix_keeps_the_trees_slots():
    alloc, cache = make()
    first = finish(cache, [1, 2, 3, 4, 5])
    # Like the scheduler: the whole prompt is cached, yet the last token is recomputed.
    second = finish(cache, [1, 2, 3, 4, 5, 6, 7], reused=4)
    assert second[:4].tolist() == first[:4].tolist()
    assert alloc.used_size() == cache.total_cached() == 7
    assert cache.evictable_size() == 7
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7]).slots.tolist() == first.tolist() + second[5:].tolist()
    check(cache)


def test_slots_must_not_interleave_with_the_trees():
    alloc, cache = make()
    first = finish(cache, [1, 2, 3])
    own = alloc.alloc(1)
    bogus = np.array([own[0], first[1], first[2]])
    with pytest.raises(KVAllocationError):
        cache.cache_finished_req([1, 2, 3], bogus, None)


def test_lock_protects_from_eviction_until_unlocked():
    alloc, cache = make()
    finish(cache, [1, 2, 3])
    finish(cache, [5, 6])
    match = cache.match_prefix([1, 2, 3])
    cache.lock(match.handle)
    assert cache.evict(100) == 2
    assert cache.match_prefix([1, 2, 3]).slots.size == 3
    cache.unlock(match.handle)
    with pytest.raises(KVAllocationError):
        cache.unlock(match.handle)
    assert cache.evict(100) == 3 and alloc.used_size() == 0
    check(cache)


def test_lru_order_and_exact_slots_freed():
    alloc, cache = make()
    a = finish(cache, [1, 1, 1])
    b = finish(cache, [2, 2])
    c = finish(cache, [3, 3, 3, 3])
    cache.match_prefix([1, 1, 1, 9])  # touching `a` makes `b` the least recently used
    assert cache.evict(1) == 2
    assert not alloc._in_use[b].any() and alloc._in_use[np.concatenate([a, c])].all()
    assert cache.evict(1) == 4 and not alloc._in_use[c].any()
    assert cache.match_prefix([1, 1, 1]).slots.tolist() == a.tolist()
    assert cache.stats()["evicted_tokens"] == 6
    check(cache)


def test_inner_node_becomes_evictable_after_its_children():
    alloc, cache = make()
    finish(cache, [1, 2, 3])
    finish(cache, [1, 2, 4, 5])  # splits [1, 2, 3] into [1, 2] -> {[3], [4, 5]}
    assert cache.evict(4) == 5, "both leaves first, then their parent"
    assert cache.total_cached() == 0 and alloc.used_size() == 0
    check(cache)


def test_image_hash_elements_keep_requests_apart():
    alloc, cache = make()
    image_a, image_b = 2**64 + 17, 2**64 + 18  # content hashes need not fit in int64
    finish(cache, [1, 2, image_a, 5, 6])
    assert cache.match_prefix([1, 2, image_b, 5, 6]).slots.size == 2
    assert cache.match_prefix([1, 2, image_a, 5, 6]).slots.size == 5
    check(cache)


def test_reset_frees_everything_but_not_while_locked():
    alloc, cache = make()
    finish(cache, [1, 2, 3])
    finish(cache, [1, 4])
    match = cache.match_prefix([1, 4])
    cache.lock(match.handle)
    with pytest.raises(RuntimeError):
        cache.reset()
    cache.unlock(match.handle)
    cache.reset()
    assert alloc.available_size() == alloc.size and cache.total_cached() == 0
    with pytest.raises(KVAllocationError):
        cache.lock(match.handle)  # a handle from before the flush is stale
    finish(cache, [1, 2])
    assert cache.match_prefix([1, 2]).slots.size == 2
    check(cache)


def test_stats_count_lookups():
    alloc, cache = make()
    finish(cache, [1, 2, 3, 4])  # a lookup of 4 elements, nothing found
    cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8])
    stats = cache.stats()
    assert (stats["hit_tokens"], stats["queried_tokens"], stats["cached_tokens"]) == (4, 12, 4)
    assert stats["hit_rate"] == pytest.approx(4 / 12)


# ---------------- randomized: a small "scheduler" against the real allocator ----------------

class _Sim:
    """Requests that match, lock, compute and finish, with a model of what each slot holds."""

    def __init__(self, seed: int, pool: int):
        self.rng = random.Random(seed)
        self.alloc, self.cache = make(pool)
        # slot -> the key prefix whose last element's KV it holds: a reused slot must hold
        # exactly the KV of the position it is reused for.
        self.content: Dict[int, Tuple[int, ...]] = {}
        self.active: List[Tuple[List[int], np.ndarray, object]] = []
        self.families = [[self.rng.randrange(50) for _ in range(self.rng.randrange(1, 12))] for _ in range(4)]

    def key(self) -> List[int]:
        head = list(self.rng.choice(self.families))[: self.rng.randrange(0, 13)]
        return head + [self.rng.randrange(6) for _ in range(self.rng.randrange(1, 8))]

    def admit(self) -> None:
        key = self.key()
        match = self.cache.match_prefix(key)
        for i, slot in enumerate(match.slots.tolist()):
            assert self.content[slot] == tuple(key[: i + 1])
        self.cache.lock(match.handle)
        reused = min(match.slots.size, len(key) - 1, self.rng.randrange(len(key) + 1))
        computed = self.rng.randrange(reused, len(key) + 1)  # a retracted chunked prefill stops early
        need = computed - reused
        if self.alloc.available_size() < need:
            self.cache.evict(need - self.alloc.available_size())
        own = self.alloc.alloc(need)
        if own is None:
            self.cache.unlock(match.handle)
            return
        for i, slot in enumerate(own.tolist(), start=reused):
            self.content[slot] = tuple(key[: i + 1])
        self.active.append((key[:computed], np.concatenate([match.slots[:reused], own]), match.handle))

    def finish(self) -> None:
        key, slots, handle = self.active.pop(self.rng.randrange(len(self.active)))
        self.cache.cache_finished_req(key, slots, handle)

    def step(self) -> None:
        op = self.rng.random()
        if op < 0.45:
            self.admit()
        elif op < 0.8 and self.active:
            self.finish()
        elif op < 0.9:
            self.cache.evict(self.rng.randrange(1, 10))
        else:
            self.cache.match_prefix(self.key())

    def check(self) -> None:
        check(self.cache)
        owned = 0
        for key, slots, handle in self.active:
            # Requests own what the tree does not; the two never share a slot.
            owned += int((~np.isin(slots, self.cache.cached_slots())).sum())
        assert self.alloc.used_size() == owned + self.cache.total_cached()
        assert self.cache.evictable_size() <= self.cache.total_cached()


# Small pools force evictions and failed admissions; large ones let the tree grow deep.
@pytest.mark.parametrize("seed,pool", list(enumerate([24, 32, 40, 64, 200, 500])))
def test_random_operations_keep_every_invariant(seed, pool):
    sim = _Sim(seed, pool)
    for _ in range(400):
        sim.step()
        sim.check()
    while sim.active:
        sim.finish()
        sim.check()
    assert sim.cache.evictable_size() == sim.cache.total_cached() == sim.alloc.used_size()
    sim.cache.reset()
    assert sim.alloc.available_size() == sim.alloc.size
    sim.alloc.check_invariants()

