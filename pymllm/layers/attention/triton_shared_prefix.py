"""Attention of a short extend run as decode rows of ONE request: the shared prefix read once.

A few new tokens on a long cached prefix (a new turn, a prefix-cache hit) replay a CUDA graph with
one row per new token (``cuda_graph_runner.extend_runs_as_decode``). ``triton_decode``'s per-row
kernel would read the request's whole KV once per row (32 rows of Qwen3-8B on 2,000 cached tokens:
32 passes over ~300 MB per forward); here one program per (KV head, split[, row slice]) loads
each K/V block once and scores it against every row's query heads with one tensor-core product,
each row masked to its own length. Splits merge in the last-arriving program (as in
``triton_decode``) or, with ``separate_merge``, in a second launch, which the attention backend
uses: one program merging every row of its KV head turned out to be the long pole (H200, 32 rows
on 2,000 cached tokens, Qwen3-8B heads: 43.4 us per layer in-kernel, 16.9 us with the merge
kernel, 63.6 us for per-row decode).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pymllm.layers.attention.triton_decode import (
    arrival_counters_for,
    check_attention_args,
    merge_splits,
    output_for,
    split_scratch,
)

MAX_SHARED_PREFIX_ROWS = 64  # rows (new tokens) per call
BLOCK_N = 32  # KV tokens per inner step (its tiles score many rows at once: registers, not loads, bound it)
_SP_CHUNK = 128  # most query rows (tokens x heads of one KV head) in one tl.dot tile
_SP_MAX_SPLITS = 64
# 8 warps for every tile size. Compiled for sm_90 (Triton 3.9, bf16, D=128; ptxas's count from
# the cubin, no GPU needed) the 128-row tile takes 187-233 registers per thread with 8 warps for
# GQA group 4 and 1-64 splits, none spilled, the 16-64-row tiles 145-235; with 4 warps the 64-
# and 128-row tiles spill (up to 544 bytes of stack). So one program (256 threads) fills an SM's
# register file: see shared_prefix_num_splits. (Leftovers: a few 8-24-byte spills for group 1-2
# with one split, 368 bytes for a two-chunk slice with group 2, and D=256 spills: 168 bytes.)
_SP_WARPS = 8


def shared_prefix_num_splits(num_kv_heads: int, num_sms: int, row_programs: int = 1,
                             max_splits: int = _SP_MAX_SPLITS) -> int:
    """Splits of the KV range for ``shared_prefix_attention``: the largest power of two with
    kv_heads * row_programs * splits <= num_sms (at least 1, at most ``max_splits``). One
    program per SM, not two as ``num_splits_for``: a program takes ~150-235 registers x 256
    threads, so a second one would not be resident, and finer splits only add partials to write
    and merge. Qwen3-8B (8 KV heads) on 132 SMs: 16; with row_programs=4: 4. Independent of the
    row count (the grid is fixed per CUDA graph)."""
    want = num_sms // max(1, num_kv_heads * row_programs)
    return max(1, min(max_splits, triton.next_power_of_2(want + 1) // 2))


@triton.jit
def _shared_prefix_merge(o_ptr, lse_ptr, out_ptr, t_begin, t_end, kv_head, num_q_heads, out_stride_b,
                         out_stride_h, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, MERGE_ROWS: tl.constexpr, MERGE_UNROLL: tl.constexpr):
    """Merge the NUM_SPLITS partials of tile rows [t_begin, t_end) of one KV head (tile row t:
    query row t // GROUP_PAD, head kv_head * GROUP + t % GROUP_PAD), MERGE_ROWS at a time: a
    [MERGE_ROWS, HEAD_DIM] float32 tile is 8 KiB, so MERGE_UNROLL splits' loads fit in flight
    without spilling. Unlike ``_merge_group`` a row may have no tokens in split 0 (its window
    starts later), so the running max is guarded: it stays -inf until the row's first non-empty
    split, which then gets weight 1."""
    t_local = tl.arange(0, MERGE_ROWS)
    dims = tl.arange(0, HEAD_DIM)
    for t0 in range(t_begin, t_end, MERGE_ROWS):
        t = t0 + t_local
        row = t // GROUP_PAD
        g = t % GROUP_PAD
        ok = (t < t_end) & (g < GROUP)
        heads = kv_head * GROUP + g
        base = (row.to(tl.int64) * num_q_heads + heads) * NUM_SPLITS
        m = tl.full([MERGE_ROWS], float("-inf"), tl.float32)
        l = tl.zeros([MERGE_ROWS], tl.float32)
        acc = tl.zeros([MERGE_ROWS, HEAD_DIM], tl.float32)
        for s0 in range(0, NUM_SPLITS, MERGE_UNROLL):
            for u in tl.static_range(MERGE_UNROLL):
                part = base + s0 + u
                lse = tl.load(lse_ptr + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
                o = tl.load(o_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None], other=0.0,
                            cache_modifier=".cg")
                m_new = tl.maximum(m, lse)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m - m_use)
                w = tl.exp(lse - m_use)
                acc = acc * alpha[:, None] + w[:, None] * o
                l = l * alpha + w
                m = m_new
        merged = acc / tl.where(l > 0, l, 1.0)[:, None]
        out_off = row.to(tl.int64)[:, None] * out_stride_b + heads[:, None] * out_stride_h + dims[None, :]
        tl.store(out_ptr + out_off, merged.to(out_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _shared_prefix_kernel(
    q_ptr, k_ptr, v_ptr, req_to_token_ptr, req_idx_ptr, seq_lens_ptr, o_ptr, lse_ptr,
    out_ptr, counter_ptr, num_rows,
    q_stride_b, q_stride_h, kv_stride_s, kv_stride_h, r2t_stride, out_stride_b, out_stride_h,
    sm_scale, window_left,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, LEN_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK: tl.constexpr, SLICE: tl.constexpr, CHUNK: tl.constexpr,
    FUSED_MERGE: tl.constexpr, MERGE_ROWS: tl.constexpr, MERGE_UNROLL: tl.constexpr,
):
    """Grid (kv_heads, splits, row_programs). Tile row t is query row t // GROUP_PAD, query head
    kv_head * GROUP + t % GROUP_PAD; program (kv_head, split, c) owns tile rows [c * SLICE,
    (c + 1) * SLICE) and walks its split's K/V once per CHUNK of them (once when SLICE <= 128),
    scoring each K/V block against the whole chunk with one tl.dot."""
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    c = tl.program_id(2)
    num_kv_heads = tl.num_programs(0)
    num_q_heads = num_kv_heads * GROUP

    # The request's KV range: [min window start, max length) over its real rows, those with the
    # leader's req_pool_index. The others are padding and get the longest real row's length:
    # finite output that does not widen the range.
    leader = tl.load(req_idx_ptr)
    r = tl.arange(0, LEN_ROWS)
    r_in = r < num_rows
    r_real = r_in & (tl.load(req_idx_ptr + r, mask=r_in, other=-1) == leader)
    r_len = tl.load(seq_lens_ptr + r, mask=r_real, other=0).to(tl.int32)
    hi = tl.max(r_len, axis=0)  # >= 1: row 0 is real
    r_lo = tl.where(window_left >= 0, tl.maximum(r_len - 1 - window_left, 0), 0)
    lo = tl.min(tl.where(r_real, r_lo, hi), axis=0)
    chunk = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), BLOCK) * BLOCK
    start = lo + split * chunk
    end = tl.minimum(start + chunk, hi)

    # This program's tile rows that exist: [t_begin, t_end) (empty for a slice past the rows).
    t_begin = c * SLICE
    t_end = tl.minimum(t_begin + SLICE, num_rows * GROUP_PAD)
    page = req_to_token_ptr + leader.to(tl.int64) * r2t_stride
    qk_scale = sm_scale * 1.4426950408889634  # log2 domain: exp2 is one instruction
    t_local = tl.arange(0, CHUNK)
    dims = tl.arange(0, HEAD_DIM)
    # A constant trip count where the slice is one chunk (ptxas then allots ~40 registers fewer
    # to the 128-row tile than with a runtime bound); an empty slice's rows all have t_len = 0
    # below, so its chunk walks nothing.
    for k in range(0, tl.cdiv(t_end - t_begin, CHUNK) if SLICE > CHUNK else 1):
        t = t_begin + k * CHUNK + t_local
        row = t // GROUP_PAD
        g = t % GROUP_PAD
        row_in = t < t_end
        ok = row_in & (g < GROUP)
        heads = kv_head * GROUP + g
        t_real = row_in & (tl.load(req_idx_ptr + row, mask=row_in, other=-1) == leader)
        t_len = tl.load(seq_lens_ptr + row, mask=t_real, other=0).to(tl.int32)
        t_len = tl.where(row_in & ~t_real, hi, t_len)  # padding rows: as the longest real row
        t_lo = tl.where(window_left >= 0, tl.maximum(t_len - 1 - window_left, 0), 0)
        # This chunk's rows see [min t_lo, max t_len): skip the split's blocks outside it.
        n_lo = tl.maximum(start, tl.min(tl.where(row_in, t_lo, hi), axis=0))
        n_hi = tl.minimum(end, tl.max(t_len, axis=0))
        q = tl.load(q_ptr + row.to(tl.int64)[:, None] * q_stride_b + heads[:, None] * q_stride_h + dims[None, :],
                    mask=ok[:, None], other=0.0)
        m_i = tl.full([CHUNK], float("-inf"), tl.float32)
        l_i = tl.zeros([CHUNK], tl.float32)
        acc = tl.zeros([CHUNK, HEAD_DIM], tl.float32)
        for n0 in range(n_lo, n_hi, BLOCK):
            offs = n0 + tl.arange(0, BLOCK)
            tok_ok = offs < n_hi
            slots = tl.load(page + offs, mask=tok_ok, other=0).to(tl.int64)
            kv_off = slots[:, None] * kv_stride_s + kv_head * kv_stride_h + dims[None, :]
            k_blk = tl.load(k_ptr + kv_off, mask=tok_ok[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k_blk)) * qk_scale
            # Causal (and window) mask per row: tile row t sees positions [t_lo, t_len).
            visible = tok_ok[None, :] & (offs[None, :] < t_len[:, None]) & (offs[None, :] >= t_lo[:, None])
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            # A row may see nothing of this block (it ends before, or its window starts after):
            # keep its max at -inf without computing exp2(-inf - -inf) = nan.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(scores - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_blk = tl.load(v_ptr + kv_off, mask=tok_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v_blk.dtype), v_blk)
            m_i = m_new

        safe_l = tl.where(l_i > 0, l_i, 1.0)
        o = acc / safe_l[:, None]
        if NUM_SPLITS == 1:
            # One split holds every row's whole range (never empty: a row sees its own token).
            out_off = row.to(tl.int64)[:, None] * out_stride_b + heads[:, None] * out_stride_h + dims[None, :]
            tl.store(out_ptr + out_off, o.to(out_ptr.dtype.element_ty), mask=ok[:, None])
        else:
            part = (row.to(tl.int64) * num_q_heads + heads) * NUM_SPLITS + split
            tl.store(o_ptr + part[:, None] * HEAD_DIM + dims[None, :], o, mask=ok[:, None])
            # Natural-log lse of the row's slice; -inf marks a row with no tokens in this split.
            lse = tl.where(l_i > 0, (m_i + tl.log2(safe_l)) * 0.6931471805599453, float("-inf"))
            tl.store(lse_ptr + part, lse, mask=ok)

    if NUM_SPLITS > 1:
        if FUSED_MERGE:
            # Last block merges, as in _partial_kernel (see there for the ordering argument): one
            # counter per (KV head, row slice); all NUM_SPLITS programs arrive, empty ones too.
            counter = counter_ptr + kv_head * tl.num_programs(2) + c
            tl.debug_barrier()
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == NUM_SPLITS - 1:
                _shared_prefix_merge(o_ptr, lse_ptr, out_ptr, t_begin, t_end, kv_head, num_q_heads, out_stride_b,
                                     out_stride_h, GROUP, GROUP_PAD, HEAD_DIM, NUM_SPLITS, MERGE_ROWS,
                                     MERGE_UNROLL)
                tl.store(counter, 0)  # everyone has arrived: ready for the next launch


def shared_prefix_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    num_splits: int,
    window_left: int = -1,
    out: Optional[torch.Tensor] = None,
    counters: Optional[torch.Tensor] = None,
    separate_merge: bool = False,
    row_programs: int = 1,
) -> torch.Tensor:
    """Causal attention of R new tokens of ONE request (a short extend run as decode rows).

    q [R, Hq, D], 1 <= R <= MAX_SHARED_PREFIX_ROWS (64; more raises ValueError). Row i is the
    query at position seq_lens[i] - 1 and sees positions [0, seq_lens[i]) of the page-table
    row ``req_to_token[req_pool_indices[0]]`` (with ``window_left`` >= 0: [seq_lens[i] - 1 -
    window_left, seq_lens[i] - 1], as in ``decode_attention``); all its K/V are stored. Rows
    whose req_pool_index differs from row 0's are padding (a CUDA graph's batch padding): they
    get finite, meaningless output and do not widen the KV range. For the real rows this is
    ``decode_attention`` on the same arguments, but each K/V block is read once per (KV head,
    split, row program) instead of once per row.

    Grid (kv_heads, num_splits, row_programs). The KV range [min window start, max seq_len) of
    the real rows is computed on the device (graph replays may change the lengths and how many
    rows are real) and cut into num_splits slices. The query rows of one KV head, R x group
    (group padded to a power of two, R to a power of two, at least 16), are split into
    ``row_programs`` equal slices (a power of two; fewer if a slice would drop below 16 rows).
    A program scores its K/V slice against its row slice in tiles of up to 128 query rows
    (32 tokens x 4 heads for Qwen3-8B) on tensor cores; a larger row slice (64 tokens x 4
    heads with row_programs=1) is processed as consecutive 128-row chunks, each walking the K/V
    slice again (from L1/L2), so registers stay bounded. K/V blocks are BLOCK_N = 32 tokens
    (scores [128, 32] fp32); 8 warps throughout (see _SP_WARPS).

    With num_splits > 1 the last-arriving program of each (KV head, row slice) merges that
    slice's partials in-kernel ("last block merges"; ``counters``: int32 zeros, at least
    Hkv * row_programs elements, e.g. ``arrival_counters(row_programs, Hkv)``; left at zero;
    None allocates). That merge reads rows x splits x D x 4 bytes on one SM: 1 MiB for 128 rows
    and 16 splits, so more splits make a longer tail; row_programs > 1 shares it out (each
    slice's K/V walk is then repeated per row slice, from L2). ``separate_merge=True`` merges in
    a second launch (``_merge_kernel``, grid (R, Hq)) instead. Numerics as ``decode_attention``:
    fp32 scores and softmax, P rounded to the KV dtype for P @ V, output rounded once.
    """
    op = "shared_prefix_attention"
    num_kv_heads, group = check_attention_args(op, q, k_buf, v_buf, num_splits)
    rows, _, head_dim = q.shape
    if row_programs < 1 or row_programs & (row_programs - 1):
        raise ValueError(f"{op}: row_programs must be a power of two, got {row_programs}")
    if rows > MAX_SHARED_PREFIX_ROWS:
        raise ValueError(f"{op}: at most {MAX_SHARED_PREFIX_ROWS} rows, got {rows}")
    for name, vec in (("req_pool_indices", req_pool_indices), ("seq_lens", seq_lens)):
        if vec.dim() != 1 or vec.numel() < rows or (rows > 1 and vec.stride(0) != 1):
            raise ValueError(f"{op}: {name} must be a dense vector of >= {rows} elements, got {tuple(vec.shape)}")
    out = output_for(op, q, out)
    if rows == 0:
        return out
    fused = num_splits > 1 and not separate_merge
    o_part, lse_part = split_scratch(q, num_splits, out)
    counters = arrival_counters_for(op, fused, counters, row_programs, num_kv_heads, out)
    group_pad = triton.next_power_of_2(group)
    tile_rows = max(16, triton.next_power_of_2(rows) * group_pad)  # >= 16 for tl.dot
    programs = min(row_programs, tile_rows // 16)
    slice_rows = tile_rows // programs
    chunk = min(_SP_CHUNK, slice_rows)
    # Merge tiles of [merge_rows, D] fp32 = 8 KiB, 4 splits' loads at a time: 16 rows x 4 splits
    # kept the 128-row kernel at 187 registers in ptxas's count, 32 x 2 or 64 x 1 spilled.
    merge_rows = min(chunk, max(16, 2048 // head_dim))
    _shared_prefix_kernel[(num_kv_heads, num_splits, programs)](
        q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, o_part, lse_part, out, counters, rows,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), req_to_token.stride(0),
        out.stride(0), out.stride(1), sm_scale, window_left,
        GROUP=group, GROUP_PAD=group_pad, LEN_ROWS=max(16, triton.next_power_of_2(rows)), HEAD_DIM=head_dim,
        NUM_SPLITS=num_splits, BLOCK=BLOCK_N, SLICE=slice_rows, CHUNK=chunk, FUSED_MERGE=fused,
        MERGE_ROWS=merge_rows, MERGE_UNROLL=min(4, num_splits), num_warps=_SP_WARPS, num_stages=2,
    )
    if num_splits > 1 and not fused:
        merge_splits(o_part, lse_part, out, num_splits)
    return out
