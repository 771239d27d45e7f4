"""store_cache: write the K/V of new tokens into their KV-cache slots."""

from __future__ import annotations

import torch

from mllm_kernel.checks import (
    check_contiguous,
    check_dense_inner_dims,
    check_same_device,
    check_same_dtype,
    check_size,
    check_tensor,
)
from mllm_kernel.jit_utils import BuildStep, JitKernel, jit

_OP = "store_cache"
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


@jit(
    "store_cache",
    entry="mllm_kernel::store_cache",
    cuda_sources=["cuda/csrc/store_cache/store_cache.cuh"],
    cpu_sources=["cpu/csrc/store_cache/store_cache.h"],
)
def store_cache(
    kernel: JitKernel,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out_cache_loc: torch.Tensor,
) -> None:
    """In place: ``k_cache[out_cache_loc[i]] = k[i]`` and ``v_cache[out_cache_loc[i]] = v[i]``.

    k, v: [T, H, D] float16/bfloat16/float32; k_cache, v_cache: [num_slots, H, D]
    of the same dtype; out_cache_loc: [T] int32/int64 with distinct values in
    [0, num_slots). The last two dims must be dense; the token/slot stride is
    free, so slices of a fused QKV output or of a per-layer cache work as is.
    Out-of-range indices raise on CPU and are undefined behaviour on CUDA
    (checking them there would need a host sync).
    """
    hint = "[num_tokens, num_heads, head_dim]"
    check_tensor(_OP, "k", k, ndim=3, dtypes=VALUE_DTYPES, shape_hint=hint)
    check_tensor(_OP, "v", v, ndim=3, dtypes=VALUE_DTYPES, shape_hint=hint)
    cache_hint = "[num_slots, num_heads, head_dim]"
    check_tensor(_OP, "k_cache", k_cache, ndim=3, dtypes=VALUE_DTYPES, shape_hint=cache_hint)
    check_tensor(_OP, "v_cache", v_cache, ndim=3, dtypes=VALUE_DTYPES, shape_hint=cache_hint)
    check_tensor(_OP, "out_cache_loc", out_cache_loc, ndim=1, dtypes=INDEX_DTYPES, shape_hint="[num_tokens]")
    tensors = {"k": k, "v": v, "k_cache": k_cache, "v_cache": v_cache}
    check_same_dtype(_OP, tensors)
    check_same_device(_OP, {**tensors, "out_cache_loc": out_cache_loc})
    if v.shape != k.shape:
        raise ValueError(f"{_OP}: v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
    for name in ("k_cache", "v_cache"):
        check_size(_OP, name, tensors[name], 1, k.shape[1], "num_heads of k")
        check_size(_OP, name, tensors[name], 2, k.shape[2], "head_dim of k")
    check_size(_OP, "v_cache", v_cache, 0, k_cache.shape[0], "num_slots of k_cache")
    check_size(_OP, "out_cache_loc", out_cache_loc, 0, k.shape[0], "num_tokens of k")
    for name, tensor in tensors.items():
        check_dense_inner_dims(_OP, name, tensor, 2)
    check_contiguous(_OP, "out_cache_loc", out_cache_loc)
    kernel[k.dtype, out_cache_loc.dtype](k, v, k_cache, v_cache, out_cache_loc)


def store_cache_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out_cache_loc: torch.Tensor,
) -> None:
    """Pure-PyTorch equivalent of :func:`store_cache`."""
    k_cache[out_cache_loc] = k
    v_cache[out_cache_loc] = v


def build_step(dtype: torch.dtype, device: torch.device, loc_dtype: torch.dtype = torch.int64) -> BuildStep:
    """The instance a KV pool of ``dtype`` with ``loc_dtype`` slots compiles."""
    return store_cache.kernel[dtype, loc_dtype].build_step(device)
