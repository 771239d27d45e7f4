"""Choose the prefix cache from the server config."""

from __future__ import annotations

from pymllm.configs.global_config import GlobalConfig
from pymllm.mem_cache.base_prefix_cache import ChunkCache, PrefixCache
from pymllm.mem_cache.memory_pool import TokenToKVPoolAllocator
from pymllm.mem_cache.radix_cache import RadixCache


def create_prefix_cache(config: GlobalConfig, allocator: TokenToKVPoolAllocator) -> PrefixCache:
    """RadixCache (prefix reuse) unless --server.disable_radix_cache asks for ChunkCache."""
    if config.server.disable_radix_cache:
        return ChunkCache(allocator)
    return RadixCache(allocator)
