"""The prefix-cache interface the scheduler talks to (ChunkCache, RadixCache)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np

from pymllm.mem_cache.memory_pool import TokenToKVPoolAllocator


@dataclass
class PrefixMatch:
    slots: np.ndarray  # KV slots of the matched prefix, in token order
    handle: Any = None  # cache-owned reference passed back to lock/unlock/cache_*


class PrefixCache(abc.ABC):
    def __init__(self, allocator: TokenToKVPoolAllocator):
        self.allocator = allocator

    @abc.abstractmethod
    def match_prefix(self, key: List[int]) -> PrefixMatch:
        """Longest cached prefix of `key` (token ids, or token ids mixed with image hashes)."""

    def lock(self, handle: Any) -> None:
        """Protect a matched prefix from eviction while a request uses it."""

    def unlock(self, handle: Any) -> None:
        """Release a lock taken by `lock`."""

    @abc.abstractmethod
    def cache_finished_req(self, key: List[int], slots: np.ndarray, handle: Any) -> None:
        """A request finished: the cache takes ownership of its slots (keep or free them)."""

    def evictable_size(self) -> int:
        return 0

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` unreferenced slots if possible; returns how many were freed."""
        return 0

    def total_cached(self) -> int:
        return 0

    def reset(self) -> None:
        """Drop every cached entry (only valid when no request holds a lock)."""

    def stats(self) -> dict:
        return {}


class ChunkCache(PrefixCache):
    """No reuse: a finished request's slots go straight back to the allocator."""

    def match_prefix(self, key: List[int]) -> PrefixMatch:
        return PrefixMatch(slots=np.empty(0, dtype=np.int64))

    def cache_finished_req(self, key: List[int], slots: np.ndarray, handle: Optional[Any]) -> None:
        self.allocator.free(slots)
