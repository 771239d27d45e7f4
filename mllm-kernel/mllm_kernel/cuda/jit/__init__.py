"""Python entry points of the JIT kernels (each serves CPU and CUDA tensors)."""

from mllm_kernel.cuda.jit.create_kv_indices import create_kv_indices, create_kv_indices_reference
from mllm_kernel.cuda.jit.store_cache import store_cache, store_cache_reference

__all__ = ["create_kv_indices", "create_kv_indices_reference", "store_cache", "store_cache_reference"]
