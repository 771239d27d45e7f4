from pymllm.mem_cache.memory_pool import (
    KVAllocationError,
    KVPool,
    ReqToTokenPool,
    TokenToKVPoolAllocator,
)

__all__ = ["KVAllocationError", "KVPool", "ReqToTokenPool", "TokenToKVPoolAllocator"]
