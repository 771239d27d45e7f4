"""The token embedding as the producer of the first layer's deferred RMSNorm, in one launch.

At batch 1 a decode graph starts with the embedding gather and layer 0's input RMSNorm: two
kernels whose work is a few kilobytes each, so their launches and the norm's row reduction are
what they cost. Every later norm of the step is already deferred into the projections around it
(pymllm.layers.deferred_norm); this kernel makes the embedding the producer of the first one:
per row it gathers h = E[token], stores h (the residual stream), ``w * h`` (rounded once, what
the producer GEMVs write) and the float32 sum of h^2 of each column tile, and layer 0's qkv
GEMV applies 1 / rms(h) to its outputs like every other consumer.

Grid (rows, tiles): each program handles one tile of one row, so no program waits for a
row-wide reduction. It is launched without programmatic dependent launch: it is the graph's
first computing kernel and follows PyTorch kernels (the req_to_token writes), and the kernels
after it read those writes before their own PDL waits only because this one ran after them.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

BLOCK = 1024  # columns per program: 4 tiles for a 4,096-wide row
NUM_WARPS = 4


def num_tiles(hidden: int) -> int:
    return triton.cdiv(hidden, BLOCK)


@triton.jit
def _embedding_deferred_norm_kernel(
    ids_ptr, weight_ptr, norm_w_ptr, scaled_ptr, residual_ptr, sumsq_ptr,
    hidden, weight_stride, out_stride, TILES: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    w = tl.load(norm_w_ptr + cols, mask=mask, other=0.0)
    token = tl.load(ids_ptr + row).to(tl.int64)
    h = tl.load(weight_ptr + token * weight_stride + cols, mask=mask, other=0.0)
    hf = h.to(tl.float32)
    tl.store(residual_ptr + row * out_stride + cols, h, mask=mask)
    tl.store(scaled_ptr + row * out_stride + cols, (w.to(tl.float32) * hf).to(h.dtype), mask=mask)
    tl.store(sumsq_ptr + row * TILES + tile, tl.sum(hf * hf, axis=0))


def embedding_deferred_norm(
    input_ids: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``norm_weight * h`` [rows, H], h [rows, H], float32 tile sums of h^2 [rows, tiles]) for
    h = ``weight[input_ids]``: the parts of a ``DeferredNorm`` (the caller adds eps)."""
    if input_ids.dim() != 1 or input_ids.dtype not in (torch.int32, torch.int64) or not input_ids.is_contiguous():
        raise ValueError(f"embedding_deferred_norm: input_ids must be contiguous 1-D int32/int64, got "
                         f"{input_ids.dtype} {tuple(input_ids.shape)}")
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"embedding_deferred_norm: weight must be [vocab, hidden] dense in hidden, got "
                         f"{tuple(weight.shape)}")
    hidden = weight.shape[1]
    if norm_weight.shape != (hidden,) or norm_weight.dtype != weight.dtype or not norm_weight.is_contiguous():
        raise ValueError(f"embedding_deferred_norm: norm_weight must be contiguous [{hidden}] {weight.dtype}, got "
                         f"{norm_weight.dtype} {tuple(norm_weight.shape)}")
    rows, tiles = input_ids.numel(), num_tiles(hidden)
    scaled = torch.empty(rows, hidden, dtype=weight.dtype, device=weight.device)
    residual = torch.empty_like(scaled)
    sumsq = torch.empty(rows, tiles, dtype=torch.float32, device=weight.device)
    if rows:
        _embedding_deferred_norm_kernel[(rows, tiles)](
            input_ids, weight, norm_weight, scaled, residual, sumsq, hidden, weight.stride(0), scaled.stride(0),
            TILES=tiles, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
    return scaled, residual, sumsq
