"""The tail of a decode step in one launch: float32 logits and their greedy argmax.

A decode graph ends with the LM head's model-dtype logits, which the sampler wants as float32,
and their argmax, which greedy sampling reads. As two PyTorch ops that is a cast kernel, a
memset and a two-pass reduction (Qwen3-8B bs1 on an H200: 3.2 + 0.9 + 8.2 us plus the gaps
between them, ~15 us of a 4.2 ms step). Here every program casts and stores one block of a row
and writes that block's (max, first index); the program that finishes last among a row's blocks
reduces those partials and writes the row's argmax ("last block merges", as the decode attention
does), then resets its arrival counter for the next launch.

Two optional extra destinations for the ids serve the overlapped decode loop, where the next step
reads them (pymllm.executor.cuda_graph_runner): ``feed`` (the next step's input-token buffer, so no
copy runs between the two graphs) and ``mirror`` (a pinned host ring, row ``slot``, with ``slot``
read from the device when the kernel runs: the host reads the tokens from there after an event,
with no device-to-host copy queued between the two steps).

Ties resolve to the first index, as ``torch.argmax`` does. NaN ranks above every number (torch's
argmax returns a NaN's index too); the only difference is a row holding both +inf and a later
NaN, where this kernel may return the +inf.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from pymllm.layers.kernels.pdl import enter_dependent, launch_options

BLOCK = 4096  # elements per program: 38 programs per row of Qwen3's 151,936-entry vocabulary
NUM_WARPS = 4


def num_blocks(vocab: int) -> int:
    return triton.cdiv(vocab, BLOCK)


def arrival_counters(max_rows: int, device) -> torch.Tensor:
    """int32 zeros, one per row: what ``float_logits_argmax`` needs; each launch leaves them at zero
    again, so one buffer serves every call (and every replay of a graph that captured one)."""
    return torch.zeros(max_rows, dtype=torch.int32, device=device)


@triton.jit
def _float_argmax_kernel(
    x_ptr, out_ptr, part_val_ptr, part_idx_ptr, ids_ptr, counter_ptr, feed_ptr, mirror_ptr, slot_ptr,
    vocab, x_stride, out_stride, mirror_stride,
    NUM_BLOCKS: tl.constexpr, MERGE: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
    FEED: tl.constexpr, MIRROR: tl.constexpr,
):
    enter_dependent(USE_PDL)
    row = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < vocab
    x = tl.load(x_ptr + row.to(tl.int64) * x_stride + offs, mask=ok, other=float("-inf")).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * out_stride + offs, x, mask=ok)
    key = tl.where(x != x, float("inf"), x)
    best = tl.max(key, axis=0)
    # First index of the maximum (positions past the vocabulary hold -inf and never win over a
    # real element: the first block always has one, and ties keep the smaller index).
    first = tl.min(tl.where(key == best, offs, vocab + BLOCK), axis=0)
    part = row * NUM_BLOCKS + blk
    tl.store(part_val_ptr + part, best)
    tl.store(part_idx_ptr + part, first)
    # Publish the partial, then arrive; the program that arrives last sees every partial (the
    # release of each arrival and this one's acquire order them), as in triton_decode.
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel", scope="gpu")
    if arrived == NUM_BLOCKS - 1:
        slots = tl.arange(0, MERGE)
        live = slots < NUM_BLOCKS
        vals = tl.load(part_val_ptr + row * NUM_BLOCKS + slots, mask=live, other=float("-inf"), cache_modifier=".cg")
        idxs = tl.load(part_idx_ptr + row * NUM_BLOCKS + slots, mask=live, other=2147483647, cache_modifier=".cg")
        top = tl.max(vals, axis=0)
        pick = tl.min(tl.where(live & (vals == top), idxs, 2147483647), axis=0)
        pick = pick.to(tl.int64)
        tl.store(ids_ptr + row, pick)
        if FEED:
            tl.store(feed_ptr + row, pick)
        if MIRROR:
            slot = tl.load(slot_ptr)
            tl.store(mirror_ptr + slot * mirror_stride + row, pick)
        tl.store(counter_ptr + row, 0)


def check_ids_destinations(op: str, rows: int, device: torch.device, feed: Optional[torch.Tensor],
                           mirror: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``feed``: int64 [>= rows] on ``device``, contiguous; ``mirror``: (ring [slots, >= rows] int64,
    contiguous rows, on the host (pinned where ``device`` is CUDA) or on ``device``; slot: one int64
    on ``device``)."""
    if feed is not None and (feed.dtype != torch.int64 or feed.device != device or feed.numel() < rows
                             or not feed.is_contiguous()):
        raise ValueError(f"{op}: feed must be contiguous int64 with >= {rows} elements on {device}, "
                         f"got {feed.dtype} {tuple(feed.shape)} on {feed.device}")
    if mirror is None:
        return
    ring, slot = mirror
    if ring.dim() != 2 or ring.dtype != torch.int64 or ring.shape[1] < rows or ring.stride(1) != 1:
        raise ValueError(f"{op}: the mirror ring must be int64 [slots, >= {rows}] with dense rows, "
                         f"got {ring.dtype} {tuple(ring.shape)}")
    if device.type == "cuda" and ring.device.type == "cpu" and not ring.is_pinned():
        raise ValueError(f"{op}: a host mirror ring must be pinned (the kernel writes it)")
    if slot.dtype != torch.int64 or slot.numel() != 1 or slot.device != device:
        raise ValueError(f"{op}: the mirror slot must be one int64 on {device}, got {slot.dtype} "
                         f"{tuple(slot.shape)} on {slot.device}")


def float_logits_argmax(
    logits: torch.Tensor, counters: Optional[torch.Tensor] = None, feed: Optional[torch.Tensor] = None,
    mirror: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(float32 copy of ``logits`` [rows, vocab], int64 argmax per row [rows]).

    ``counters``: int32 zeros with at least ``rows`` elements (``arrival_counters``), reused by
    every call; allocated here when missing (a memset per call, and inside a CUDA graph capture
    a memset node: pass a buffer there). ``feed``: also write the ids into ``feed[:rows]``;
    ``mirror`` = (ring, slot): also into ``ring[slot, :rows]``, ``slot`` read on the device."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"float_logits_argmax: logits must be [rows, vocab] dense in vocab, got {tuple(logits.shape)}")
    rows, vocab = logits.shape
    if vocab >= 2**31 - BLOCK:
        raise ValueError(f"float_logits_argmax: vocabulary of {vocab} entries does not fit int32 indices")
    if counters is None:
        counters = arrival_counters(rows, logits.device)
    elif counters.dtype != torch.int32 or counters.numel() < rows or not counters.is_contiguous():
        raise ValueError(f"float_logits_argmax: counters must be contiguous int32 with >= {rows} elements, "
                         f"got {counters.dtype} {tuple(counters.shape)}")
    check_ids_destinations("float_logits_argmax", rows, logits.device, feed, mirror)
    out = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    ids = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out, ids
    blocks = num_blocks(vocab)
    part_val = torch.empty(rows * blocks, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(rows * blocks, dtype=torch.int32, device=logits.device)
    ring, slot = mirror if mirror is not None else (ids, ids)
    _float_argmax_kernel[(rows, blocks)](
        logits, out, part_val, part_idx, ids, counters, feed if feed is not None else ids, ring, slot,
        vocab, logits.stride(0), out.stride(0), ring.stride(0) if mirror is not None else 0,
        NUM_BLOCKS=blocks, MERGE=triton.next_power_of_2(blocks), BLOCK=BLOCK, num_warps=NUM_WARPS,
        FEED=feed is not None, MIRROR=mirror is not None,
        **launch_options(logits.device, rows),
    )
    return out, ids
