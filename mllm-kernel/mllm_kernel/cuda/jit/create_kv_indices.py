"""create_kv_indices: FlashInfer's flat ``kv_indices`` (page size 1) from the
request-to-token table."""

from __future__ import annotations

import torch

from mllm_kernel.checks import check_contiguous, check_same_device, check_size, check_tensor
from mllm_kernel.jit_utils import BuildStep, JitKernel, jit

_OP = "create_kv_indices"
INDEX_DTYPES = (torch.int32, torch.int64)
_INT32 = (torch.int32,)


@jit(
    "create_kv_indices",
    entry="mllm_kernel::create_kv_indices",
    cuda_sources=["cuda/csrc/create_kv_indices/create_kv_indices.cuh"],
    cpu_sources=["cpu/csrc/create_kv_indices/create_kv_indices.h"],
)
def create_kv_indices(
    kernel: JitKernel,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    page_kernel_lens: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_start_idx: torch.Tensor | None = None,
    kv_indices_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``kv_indices[kv_indptr[i] + j] = req_to_token[req_pool_indices[i], start_i + j]``
    for ``j < page_kernel_lens[i]``, ``start_i = kv_start_idx[i]`` (0 when None).

    req_to_token: [max_reqs, max_context] int32 with dense rows;
    req_pool_indices: [bs] int32/int64; page_kernel_lens: [bs] int32;
    kv_indptr: [bs + 1] int32, the exclusive prefix sum of page_kernel_lens;
    kv_start_idx: optional [bs] int32/int64. Returns ``kv_indices_out``, which
    must hold at least ``kv_indptr[bs]`` int32 entries. Passing it keeps the
    call free of host syncs and allocations (CUDA-graph safe); without it the
    output is allocated here, which reads ``kv_indptr[bs]`` back to the host.
    """
    check_tensor(_OP, "req_to_token", req_to_token, ndim=2, dtypes=_INT32, shape_hint="[max_reqs, max_context]")
    check_tensor(_OP, "req_pool_indices", req_pool_indices, ndim=1, dtypes=INDEX_DTYPES, shape_hint="[batch_size]")
    batch_size = req_pool_indices.shape[0]
    check_tensor(_OP, "page_kernel_lens", page_kernel_lens, ndim=1, dtypes=_INT32, shape_hint="[batch_size]")
    check_tensor(_OP, "kv_indptr", kv_indptr, ndim=1, dtypes=_INT32, shape_hint="[batch_size + 1]")
    check_size(_OP, "page_kernel_lens", page_kernel_lens, 0, batch_size, "batch_size")
    check_size(_OP, "kv_indptr", kv_indptr, 0, batch_size + 1, "batch_size + 1")
    tensors = {
        "req_to_token": req_to_token,
        "req_pool_indices": req_pool_indices,
        "page_kernel_lens": page_kernel_lens,
        "kv_indptr": kv_indptr,
    }
    if kv_start_idx is not None:
        check_tensor(_OP, "kv_start_idx", kv_start_idx, ndim=1, dtypes=INDEX_DTYPES, shape_hint="[batch_size]")
        check_size(_OP, "kv_start_idx", kv_start_idx, 0, batch_size, "batch_size")
        tensors["kv_start_idx"] = kv_start_idx
    if kv_indices_out is None:
        kv_indices_out = torch.empty(int(kv_indptr[-1]), dtype=torch.int32, device=kv_indptr.device)
    check_tensor(_OP, "kv_indices_out", kv_indices_out, ndim=1, dtypes=_INT32, shape_hint="[total_tokens]")
    tensors["kv_indices_out"] = kv_indices_out
    check_same_device(_OP, tensors)
    if req_to_token.shape[1] > 1 and req_to_token.stride(1) != 1:
        raise ValueError(f"{_OP}: req_to_token rows must be dense, got strides {req_to_token.stride()}")
    for name, tensor in tensors.items():
        if name != "req_to_token":
            check_contiguous(_OP, name, tensor)
    start_dtype = kv_start_idx.dtype if kv_start_idx is not None else torch.int32
    kernel[req_pool_indices.dtype, start_dtype](
        req_to_token, req_pool_indices, page_kernel_lens, kv_indptr, kv_start_idx, kv_indices_out
    )
    return kv_indices_out


def create_kv_indices_reference(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    page_kernel_lens: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_start_idx: torch.Tensor | None = None,
    kv_indices_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch equivalent of :func:`create_kv_indices` (syncs with the host)."""
    lens = page_kernel_lens.long()
    total = int(lens.sum())

    def per_token(values: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(values.long(), lens, output_size=total)

    # j: position of each gathered token inside its request.
    j = torch.arange(total, device=lens.device) - per_token(torch.cumsum(lens, 0) - lens)
    starts = torch.zeros_like(lens) if kv_start_idx is None else kv_start_idx
    if kv_indices_out is None:
        kv_indices_out = torch.empty(int(kv_indptr[-1]), dtype=torch.int32, device=req_to_token.device)
    kv_indices_out[per_token(kv_indptr[:-1]) + j] = req_to_token[per_token(req_pool_indices), per_token(starts) + j]
    return kv_indices_out


def build_step(device: torch.device, index_dtype: torch.dtype = torch.int64,
               start_dtype: torch.dtype = torch.int32) -> BuildStep:
    """The instance calls with ``index_dtype`` request indices and ``start_dtype`` starts (int32
    when no kv_start_idx is given) compile."""
    return create_kv_indices.kernel[index_dtype, start_dtype].build_step(device)
