"""mllm_kernel: CPU/CUDA kernels for pymllm, compiled on first use through TVM-FFI."""

__version__ = "0.1.0"

from mllm_kernel.cuda.jit import (
    create_kv_indices,
    create_kv_indices_reference,
    gemv,
    gemv_reference,
    gemv_w8a8,
    gemv_w8a8_reference,
    store_cache,
    store_cache_reference,
    w4a16_gemv,
    w4a16_gemv_reference,
)

__all__ = [
    "__version__",
    "create_kv_indices",
    "create_kv_indices_reference",
    "gemv",
    "gemv_reference",
    "gemv_w8a8",
    "gemv_w8a8_reference",
    "store_cache",
    "store_cache_reference",
    "w4a16_gemv",
    "w4a16_gemv_reference",
]
