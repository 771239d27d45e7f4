"""Python entry points of the JIT kernels (each serves CPU and CUDA tensors)."""

from mllm_kernel.cuda.jit.create_kv_indices import create_kv_indices, create_kv_indices_reference
from mllm_kernel.cuda.jit.gemv_kernels import gemv, gemv_reference, gemv_w8a8, gemv_w8a8_reference
from mllm_kernel.cuda.jit.store_cache import store_cache, store_cache_reference
from mllm_kernel.cuda.jit.w4a16_gemm import w4a16_gemm
from mllm_kernel.cuda.jit.w4a16_gemv import w4a16_gemv
from mllm_kernel.cuda.jit.w4a16_reference import w4a16_gemm_reference, w4a16_gemv_reference

__all__ = [
    "create_kv_indices",
    "create_kv_indices_reference",
    "gemv",
    "gemv_reference",
    "gemv_w8a8",
    "gemv_w8a8_reference",
    "store_cache",
    "store_cache_reference",
    "w4a16_gemm",
    "w4a16_gemm_reference",
    "w4a16_gemv",
    "w4a16_gemv_reference",
]
