"""Pieces shared by the small-M Triton GEMM kernels: launch sizing and the split-K reduction.

Decode GEMMs (M of 1 to 64) are memory-bound: the kernel's job is to stream the weights at full
bandwidth, which needs several programs in flight per SM. A layer with N = 4096 gives too few
column blocks for that, so K is split across programs; each split writes a float32 partial and
one small kernel sums them (deterministic, unlike atomics) and adds the bias.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

# Programs per SM that keep enough loads in flight to saturate HBM on Ampere/Hopper.
PROGRAMS_PER_SM = 4
MAX_SPLIT_K = 16


@dataclass(frozen=True)
class SmallMConfig:
    """Tile sizes of one launch. USE_DOT selects tensor cores (M padded to BLOCK_M >= 16)
    over the plain multiply-reduce loop that serves M == 1."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    use_dot: bool
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count_of(device: torch.device) -> int:
    """SMs of a CUDA device; on CPU (the Triton interpreter in tests) a nominal 4."""
    if device.type != "cuda":
        return 4
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())


def pick_split_k(programs: int, k_blocks: int, sms: int) -> int:
    """Smallest power-of-two split that gives PROGRAMS_PER_SM programs per SM and divides the K blocks."""
    split = 1
    while (
        programs * split < PROGRAMS_PER_SM * sms
        and split * 2 <= MAX_SPLIT_K
        and k_blocks % (split * 2) == 0
    ):
        split *= 2
    return split


@triton.jit
def store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, M, N, pid_k,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """The small-M kernels' epilogue: without split-K, bias and the output dtype here; with it,
    the float32 partial of split ``pid_k`` for ``splitk_reduce`` to sum."""
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        partial = out_ptr + pid_k.to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(partial, acc, mask=mask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, total, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * total + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def splitk_reduce(workspace: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """out[M, N] (contiguous) = sum over splits of workspace[S, M, N] (+ bias[N])."""
    split_k, m, n = workspace.shape
    total = m * n
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(total, block),)](
        workspace, bias if bias is not None else workspace, out, total, n,
        SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
    )
