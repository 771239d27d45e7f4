"""Split-KV decode attention in Triton that reads the page table on the device: no host planning.

Why: inside a CUDA-graph decode step, FlashInfer's decode wrapper needs ``plan()`` on the host
before every replay (its split schedule depends on the sequence lengths), plus a kernel that
gathers ``kv_indices`` from ``req_to_token``. That host work (~0.2 ms) sits on the critical
path of every step, and for small batches the kernel pair itself takes ~8-10 us per layer on an
H200. These kernels take the lengths and the page table straight from the graph's static
device buffers, so a replay needs no host-side attention work at all.

One launch per layer, ``_partial_kernel``, grid (batch, kv_heads, splits): each program walks
its slice of one sequence's KV slots (looked up in ``req_to_token``) for all query heads of one
KV head (the GQA group shares every K/V load) with an online softmax, and writes the slice's
normalised output and log-sum-exp. The program that finishes last among the splits of its
(sequence, KV head) then merges all the slices with their log-sum-exps and writes the output
("last block merges", see ``_partial_kernel``) instead of a second launch. On an H200
(Qwen3-0.6B heads 16/8, batch 1, 32 splits, graph replay; bench_decode_attention.py) the
partial kernel alone takes 3.2 us, partial + merge kernel 5.3 us, this one launch 4.8 us: the
merge now costs the atomic's release/acquire and one round of L2 loads at the tail instead of a
kernel boundary (1.7 us less at batch 16 with GQA group 4). The split count is fixed per batch
size (a CUDA graph fixes the grid) and chosen to give the GPU enough programs; a split with no
tokens writes lse = -inf and drops out of the merge. With one split the program writes the
output directly: no scratch, no counter.

With ``rope=DecodeRope(...)`` the kernel also applies the layer's q/k norms and rotary
embedding and stores the new K/V (pymllm.layers.attention.decode_rope): the separate
q/k-norm-rope launch is gone from a graph decode step.

``separate_merge=True`` keeps the earlier two-launch form (partials, then ``_merge_kernel``,
grid (batch, q_heads)) for benchmarks and as a cross-check.

``shared_prefix_attention`` covers a short extend run as decode rows: R new tokens of ONE
request, row i at position seq_lens[i] - 1. Per row, ``decode_attention`` would read the whole
shared prefix R times; this kernel (grid (kv_heads, splits, row_programs)) reads each K/V block
of a split once per row slice and scores it against all of the slice's R x group query rows
with one tl.dot, masking each row causally by its own length, then merges the splits in the
same way.

Numerics: scores and softmax in float32, P rounded to the KV dtype for the P @ V product on
tensor cores (as FlashInfer does), output rounded once.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from pymllm.layers.attention.decode_rope import (
    DecodeRope, check_decode_rope, rope_kernel_args, rope_new_token, rope_operands,
)
from pymllm.layers.kernels.pdl import enter_dependent, launch_options

# Launch settings from scripts/tune_triton_decode.py (H200, Qwen3-8B heads, bs 16-128, KV
# 1k-4k tokens; docs/perf/tune_triton_decode_h200.jsonl): 64-token KV blocks in a 3-stage
# pipeline, 4 warps, were best or within a few percent of the best everywhere, 15-40 % faster
# than the earlier 32-token blocks in 2 stages, and faster than FlashInfer's decode. A sweep with
# PDL on at batch 1-4 (both head layouts, KV 128-4k, splits 4-32) found the same settings best
# there too, and 16 splits better than 32 for one or two sequences (the merge of 32 partials
# costs more than the shorter slices gain): Qwen3-8B heads, batch 1, KV 1k / 2k / 4k, 8.1 / 10.6
# / 15.1 us per layer with 32-token blocks and 32 splits, 6.9 / 9.1 / 13.3 us now.
BLOCK_N = 64  # KV tokens per inner step, at every batch size measured (1-128)
NUM_STAGES = 3
NUM_WARPS = 4
# The one-row graph's launch with rope fused and its first K/V blocks preloaded (kv_settled): there
# a program's work after its PDL wait is a few small tiles, whose latency more warps shorten.
# Measured in the decode graphs on an H200 (runs T5/T6, processes alternating): Qwen3-8B bs1
# graph 4.078-4.088 ms with 4 warps / 3 stages, 4.022-4.058 with 8 / 2 (in1024), 4.149 vs
# 4.113-4.142 (in2048); Qwen3-0.6B 0.680-0.706 vs 0.637-0.640 ms (in128).
ROPE_NUM_WARPS = 8
ROPE_NUM_STAGES = 2
MAX_SPLITS = 16  # the split cap of every launch but the one-row graph's (ROPE_MAX_SPLITS)
# The one-row graph's split cap: with every block of a slice preloaded before the wait (below),
# shorter slices shorten what a program does after it. Qwen3-8B bs1 in1024, processes alternating:
# W8A8 on an H200 2.529-2.534 ms with 32 splits against 2.596-2.620 with 16 (runs T139/T140), on an
# H100 3.317 / 3.317 against 3.338 / 3.360 (T141); bf16 (H100) 5.323 against 5.342. The W4A16
# scheme asks for 16 (WNA16Scheme.one_row_attention_split_cap; flashinfer_backend.one_row_split_cap).
ROPE_MAX_SPLITS = 32
# K/V blocks of its slice a one-row graph's program loads into registers before its PDL wait
# (kv_settled). A slice is rounded up to whole blocks, so 16 splits of 1,025-2,048 tokens hold two
# blocks each: Qwen3-8B W4A16 bs1 in1024 at 16 splits, with two against one, H200 1.927 / 1.937
# against 1.972 / 1.962 ms (T139), H100 2.290 / 2.297 against 2.325 / 2.323 (T141). They are one
# tile of PRELOAD_BLOCKS x BLOCK tokens (a power of two), scored in one online-softmax step: the
# chain after the wait has one max / sum / rescale round instead of one per block. H100 (T153):
# W4A16 2.257 / 2.249 ms (graph 2.227 / 2.227) against two steps' 2.279 / 2.281 (2.254 / 2.255);
# W8A8 (32 splits, 64-token slices: half the tile masked) 3.316 against 3.319.
PRELOAD_BLOCKS = 2
# K/V blocks of its slice a program pulls into L2 before its PDL wait (see _partial_kernel): the
# first ones, whose latency the program would otherwise wait out; later loads are pipelined, and
# prefetching whole long slices of every program would overrun L2. A small gain, measured with
# the decode graphs on an H200 (run R15, docs/perf): Qwen3-8B bs1 4.166-4.169 vs 4.172-4.174 ms
# at 1k tokens, Qwen3-0.6B bs1 0.898 vs 0.911 ms at 2k.
PREFETCH_BLOCKS = 2
# Programs of these settings resident on one SM at a time (registers and shared memory allow
# about four): the unit of the wave model in num_splits_for.
PROGRAMS_PER_SM = 4


def num_splits_for(batch_size: int, num_kv_heads: int, num_sms: int, max_splits: int = MAX_SPLITS) -> int:
    """Splits per sequence, by a wave model: a launch of P programs runs in ceil(P / (SMs x
    PROGRAMS_PER_SM)) waves, each as long as one program's share of a sequence (1 / splits), so
    the time goes as waves / splits. A larger split count must beat the best so far by 10 %, as
    every split adds partials to write and merge (and many waves make the model's gains
    vanishingly small). One sequence spreads over the SMs; 64 sequences x 8 KV heads fill one
    wave unsplit; 96 x 8 would take 1.45 waves, so two splits (2.9 waves of half the work) are
    faster, as measured. ``max_splits``: the cap (a power of two; ROPE_MAX_SPLITS for the
    one-row graph)."""
    slots = max(1, num_sms * PROGRAMS_PER_SM)
    programs = max(1, batch_size * num_kv_heads)
    best, best_time = 1, float("inf")
    splits = 1
    while splits <= max_splits:
        time = triton.cdiv(programs * splits, slots) / splits
        if time < 0.9 * best_time:
            best, best_time = splits, time
        splits *= 2
    return best


def prefetch_line_elems(head_dim: int, element_size: int) -> int:
    """Elements of a K/V row per prefetch address: one per 128-byte line, or the whole row when it
    is shorter (head_dim and the line are powers of two, so the row holds a whole number of them)."""
    return min(head_dim, 128 // element_size)


def arrival_counters(max_batch: int, num_kv_heads: int, device) -> torch.Tensor:
    """The arrival counters ``decode_attention`` needs when it runs more than one split: int32
    zeros, one per (sequence, KV head). Allocate them once and pass them to every call (CUDA
    graphs replay with the same buffer); each launch leaves them at zero again."""
    return torch.zeros(max_batch * num_kv_heads, dtype=torch.int32, device=device)


def check_attention_args(op: str, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                         num_splits: int) -> Tuple[int, int]:
    """(KV heads, GQA group) after the layout checks the Triton attention kernels share: q
    [rows, Hq, D] dense in D, a power-of-two head_dim >= 16, K/V buffers [slots, Hkv, D] dense in
    their last two dims with equal strides, a power-of-two split count."""
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be [rows, heads, head_dim], got {tuple(q.shape)}")
    _, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buf.shape[1]
    group = num_q_heads // num_kv_heads
    if group * num_kv_heads != num_q_heads:
        raise ValueError(f"{op}: {num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"{op}: head_dim must be a power of two >= 16, got {head_dim}")
    if k_buf.shape[2] != head_dim or v_buf.shape != k_buf.shape:
        raise ValueError(f"{op}: k_buf {tuple(k_buf.shape)} / v_buf {tuple(v_buf.shape)} do not match head_dim {head_dim}")
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"{op}: num_splits must be a power of two, got {num_splits}")
    if q.stride(2) != 1:
        raise ValueError(f"{op}: q must be dense in its last dim")
    for name, buf in (("k_buf", k_buf), ("v_buf", v_buf)):
        if buf.stride(2) != 1 or buf.stride(1) != head_dim:
            raise ValueError(f"{op}: {name} must be dense in its last two dims")
    if v_buf.stride() != k_buf.stride():
        raise ValueError(f"{op}: k_buf and v_buf must share strides")
    return num_kv_heads, group


def output_for(op: str, q: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """``out`` checked against q [rows, Hq, D] (dense in D), or a new one like q."""
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"{op}: out must be {tuple(q.shape)} and dense in its last dim")
    return out


def merge_splits(o_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor, num_splits: int) -> None:
    """The separate merge launch (``separate_merge=True``): out[r, h] from the split partials."""
    rows, num_q_heads, head_dim = out.shape
    _merge_kernel[(rows, num_q_heads)](
        o_part, lse_part, out, out.stride(0), out.stride(1), HEAD_DIM=head_dim, NUM_SPLITS=num_splits, num_warps=4,
        **launch_options(out.device, rows),
    )


def split_scratch(q: torch.Tensor, num_splits: int, out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float32 partial outputs and log-sum-exps, one per (query row, head, split); with one split
    the kernels write ``out`` directly and these are placeholders. Allocated per call: inside a
    CUDA graph that happens at capture and the memory is reused by every replay."""
    if num_splits == 1:
        return out, out
    rows, heads, head_dim = q.shape
    o_part = torch.empty(rows * heads * num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(rows * heads * num_splits, dtype=torch.float32, device=q.device)
    return o_part, lse_part


def arrival_counters_for(op: str, fused: bool, counters: Optional[torch.Tensor], groups: int, num_kv_heads: int,
                         placeholder: torch.Tensor) -> torch.Tensor:
    """The counters a fused-merge launch needs (``groups`` x KV heads of them, checked, or new
    zeros), or ``placeholder`` when the launch merges otherwise."""
    if not fused:
        return placeholder
    if counters is None:
        return arrival_counters(groups, num_kv_heads, placeholder.device)
    if counters.dtype != torch.int32 or counters.numel() < groups * num_kv_heads or not counters.is_contiguous():
        raise ValueError(f"{op}: counters must be contiguous int32 with >= {groups * num_kv_heads} elements, "
                         f"got {counters.dtype} {tuple(counters.shape)}")
    return counters


@triton.jit
def _merge_group(o_ptr, lse_ptr, first_row, out_ptr, out_stride_h,
                 GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Combine the NUM_SPLITS partials of GROUP consecutive query heads (partial rows
    ``first_row + head * NUM_SPLITS + split``) and write them to ``out_ptr + head * out_stride_h``.

    This runs at the tail of the last program, after the rest of the grid is done, so its
    latency is what counts: an online merge over the splits keeps every step elementwise (no
    cross-thread reduction, hence no barrier between steps), and the unrolled steps' loads are
    independent, so they are all in flight at once. The loads bypass L1 (".cg"): other SMs wrote
    the partials, and L2 is where they are coherent (the acquire already orders them; this only
    keeps an L1 line left from a previous launch out of the picture)."""
    rows = tl.arange(0, ROWS)
    row_ok = rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    part_rows = first_row + rows * NUM_SPLITS
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    # Split 0 is never empty (seq_len >= 1), so m is finite from the first step on and an empty
    # split (lse = -inf) just gets weight 0. (Padding rows, ROWS > GROUP, turn nan; not stored.)
    for s in tl.static_range(NUM_SPLITS):
        lse = tl.load(lse_ptr + part_rows + s, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(o_ptr + (part_rows + s)[:, None] * HEAD_DIM + dims[None, :], mask=row_ok[:, None],
                    other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        alpha = tl.exp(m - m_new)
        w = tl.exp(lse - m_new)
        acc = acc * alpha[:, None] + w[:, None] * o
        l = l * alpha + w
        m = m_new
    merged = acc / l[:, None]
    tl.store(out_ptr + rows[:, None] * out_stride_h + dims[None, :], merged.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _prefetch_l2(ptrs):
    """prefetch.global.L2 of every address in ``ptrs`` (no register result, nothing in L1)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _prefetch_kv_l2(k_ptr, v_ptr, req_row, start, stop, head_offset, kv_stride_s,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, LINE_ELEMS: tl.constexpr):
    """L2 prefetch of the K and V rows of positions [start, stop) of one KV head: one address per
    128-byte line (LINE_ELEMS elements). The page table is read around L1 (".cg"), so no line of
    it stays in this SM's L1 from before the caller's wait."""
    lines = tl.arange(0, HEAD_DIM // LINE_ELEMS) * LINE_ELEMS
    for n0 in range(start, stop, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        slots = tl.load(req_row + offs, mask=offs < stop, other=0, cache_modifier=".cg").to(tl.int64)
        row_off = slots[:, None] * kv_stride_s + head_offset + lines[None, :]
        _prefetch_l2(k_ptr + row_off)
        _prefetch_l2(v_ptr + row_off)


@triton.jit
def _preload_kv_tile(k_ptr, v_ptr, req_row, n0, end, head_offset, kv_stride_s, dims, BLOCK: tl.constexpr):
    """(token mask, K, V) of the tile of positions [n0, n0 + BLOCK) before ``end``, for a load
    before the PDL wait: the page table is read around L1 (".cg"), as in _prefetch_kv_l2."""
    offs = n0 + tl.arange(0, BLOCK)
    ok = offs < end
    slots = tl.load(req_row + offs, mask=ok, other=0, cache_modifier=".cg").to(tl.int64)
    kv_off = slots[:, None] * kv_stride_s + head_offset + dims[None, :]
    return ok, tl.load(k_ptr + kv_off, mask=ok[:, None], other=0.0), tl.load(v_ptr + kv_off, mask=ok[:, None], other=0.0)


@triton.jit
def _online_softmax_block(q, k, v, tok_ok, m_i, l_i, acc, qk_scale):
    """One online-softmax step of the query rows q [R, D] over a K/V block [BLOCK, D] (tokens off
    ``tok_ok`` masked out): the updated (max, sum, accumulator), scores in the log2 domain."""
    scores = tl.dot(q, tl.trans(k)) * qk_scale
    scores = tl.where(tok_ok[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, req_to_token_ptr, req_idx_ptr, seq_lens_ptr, o_ptr, lse_ptr,
    out_ptr, counter_ptr,
    k_new_ptr, v_new_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, pos_ptr, loc_ptr,
    q_stride_b, q_stride_h, kv_stride_s, kv_stride_h, r2t_stride, out_stride_b, out_stride_h,
    k_new_stride_b, k_new_stride_h, v_new_stride_b, v_new_stride_h,
    sm_scale, window_left, eps,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK: tl.constexpr, FUSED_MERGE: tl.constexpr, MERGE_ROWS: tl.constexpr, USE_PDL: tl.constexpr,
    PREFETCH_TOKENS: tl.constexpr, LINE_ELEMS: tl.constexpr, ROPE: tl.constexpr, APPLY_NORM: tl.constexpr,
    PRELOAD_BLOCKS: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    num_q_heads = num_kv_heads * GROUP
    dims = tl.arange(0, HEAD_DIM)

    # The lengths, request rows and page table come from the step's inputs, copied in before the
    # step's first kernel, never written by a kernel of the step: they may be read before the wait.
    seq_len = tl.load(seq_lens_ptr + b, cache_modifier=".cg").to(tl.int32)
    lo = tl.where(window_left >= 0, tl.maximum(seq_len - 1 - window_left, 0), 0)
    span = seq_len - lo
    chunk = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK) * BLOCK
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)
    req_row = req_to_token_ptr + tl.load(req_idx_ptr + b, cache_modifier=".cg").to(tl.int64) * r2t_stride
    if ROPE:
        # Also step inputs: the position's cos/sin row, the norm weights and the new slot.
        partner, cos, sin, q_w, q_wp, k_w, k_wp, new_slot = rope_operands(
            q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, pos_ptr, loc_ptr, b, dims, HEAD_DIM, APPLY_NORM,
            k_ptr.dtype.element_ty)

    cached_end = end
    if ROPE:  # the new token joins from registers, after the cached ones
        cached_end = tl.minimum(end, seq_len - 1)
    first = start
    if PRELOAD_BLOCKS >= 1:
        # kv_settled with rope fused: every K/V row the loop reads was written before this step
        # (the step's own K/V this kernel stores and reads from registers), so the slice's first
        # blocks are loaded into registers before the wait, off the critical path that starts when
        # the qkv GEMV ends. Graph decode, Qwen3-8B bs1 at 1k tokens: 4.172 -> 4.093 ms (run T1).
        # The slice's first PRELOAD_BLOCKS blocks, as one tile.
        tile_ok, k_tile, v_tile = _preload_kv_tile(k_ptr, v_ptr, req_row, start, cached_end, kv_head * kv_stride_h,
                                                   kv_stride_s, dims, PRELOAD_BLOCKS * BLOCK)
        first = start + PRELOAD_BLOCKS * BLOCK

    if USE_PDL:  # programmatic dependent launch: pymllm.layers.kernels.pdl
        tl.extra.cuda.gdc_launch_dependents()
        # While the kernel before this one (q/k-norm-rope, which stores this step's K/V) still
        # runs, pull the first K/V blocks of the slice into L2, so that after the wait the
        # page-table -> K chain and the V loads hit L2 instead of DRAM. Only an L2 prefetch:
        # the K/V of this step's own tokens are written by that kernel, and L2 is where its
        # stores land, so nothing stale can be read back later.
        _prefetch_kv_l2(k_ptr, v_ptr, req_row, first, tl.minimum(end, first + PREFETCH_TOKENS),
                        kv_head * kv_stride_h, kv_stride_s, HEAD_DIM, BLOCK, LINE_ELEMS)
        tl.extra.cuda.gdc_wait()

    rows = tl.arange(0, GROUP_PAD)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    if ROPE:
        q, k_new, v_new = rope_new_token(
            q_ptr + b.to(tl.int64) * q_stride_b + heads * q_stride_h, row_ok,
            k_new_ptr + b.to(tl.int64) * k_new_stride_b + kv_head * k_new_stride_h,
            v_new_ptr + b.to(tl.int64) * v_new_stride_b + kv_head * v_new_stride_h,
            dims, partner, cos, sin, q_w, q_wp, k_w, k_wp, eps, HEAD_DIM, APPLY_NORM, k_ptr.dtype.element_ty,
        )
        holds_new = end == seq_len  # the new token (position seq_len - 1) is this slice's last
        if holds_new & (end > start):
            # Its program stores the token's K/V. Nothing in this launch reads them back: the
            # loop below stops before that slot and the token joins from registers after it
            # (swapping it into the loop's K/V tiles with a select measured 13 us per layer
            # slower on an H200, run S2 in docs/perf).
            row = new_slot * kv_stride_s + kv_head * kv_stride_h + dims[None, :]
            tl.store(k_ptr + row, k_new)
            tl.store(v_ptr + row, v_new)
    else:
        q = tl.load(q_ptr + b.to(tl.int64) * q_stride_b + heads[:, None] * q_stride_h + dims[None, :],
                    mask=row_ok[:, None], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    # log2 domain: exp2 is one instruction.
    qk_scale = sm_scale * 1.4426950408889634
    if PRELOAD_BLOCKS >= 1:
        if start < cached_end:  # an all-masked tile would turn the running max into nan
            m_i, l_i, acc = _online_softmax_block(q, k_tile, v_tile, tile_ok, m_i, l_i, acc, qk_scale)
    for n0 in range(first, cached_end, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        tok_ok = offs < cached_end
        slots = tl.load(req_row + offs, mask=tok_ok, other=0).to(tl.int64)
        kv_off = slots[:, None] * kv_stride_s + kv_head * kv_stride_h + dims[None, :]
        k = tl.load(k_ptr + kv_off, mask=tok_ok[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=tok_ok[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_block(q, k, v, tok_ok, m_i, l_i, acc, qk_scale)
    if ROPE:
        if holds_new & (end > start):
            # One more online-softmax step, for the new token: its score in float32 (the
            # products of 16-bit values are exact, as on the tensor cores), P rounded as above.
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1) * qk_scale
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_new)
            p_new = tl.exp2(s_new - m_new)
            l_i = l_i * alpha + p_new
            acc = acc * alpha[:, None] + p_new.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)
            m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[:, None]
    if NUM_SPLITS == 1:
        # One slice is the whole sequence (never empty: it holds the decoded token).
        out_off = b.to(tl.int64) * out_stride_b + heads[:, None] * out_stride_h + dims[None, :]
        tl.store(out_ptr + out_off, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        out_row = (b.to(tl.int64) * num_q_heads + heads) * NUM_SPLITS + split
        has_tokens = end > start
        tl.store(o_ptr + out_row[:, None] * HEAD_DIM + dims[None, :], o, mask=row_ok[:, None])
        # Natural-log lse of the slice; -inf marks an empty slice.
        lse = tl.where(has_tokens, (m_i + tl.log2(safe_l)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + out_row, lse, mask=row_ok)
        if FUSED_MERGE:
            # Last block merges. Every program arrives, empty slices included (the grid is
            # fixed, so the count to wait for is always NUM_SPLITS and needs no knowledge of the
            # lengths). The barrier makes all threads' partial stores above precede the atomic,
            # which Triton issues from one thread: its release (gpu scope, cumulative over what
            # the barrier ordered before it) publishes them, as __syncthreads + __threadfence +
            # atomicAdd does in CUDA. The old value comes back to every thread through shared
            # memory behind a barrier, so the merging program's loads follow its acquire.
            counter = counter_ptr + b * num_kv_heads + kv_head
            tl.debug_barrier()
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == NUM_SPLITS - 1:
                first_head = kv_head * GROUP
                _merge_group(o_ptr, lse_ptr, (b.to(tl.int64) * num_q_heads + first_head) * NUM_SPLITS,
                             out_ptr + b.to(tl.int64) * out_stride_b + first_head * out_stride_h, out_stride_h,
                             GROUP, MERGE_ROWS, HEAD_DIM, NUM_SPLITS)
                # All NUM_SPLITS programs have arrived, so nothing else touches the counter in
                # this launch: leave it at zero for the next one (graph replays reuse it).
                tl.store(counter, 0)


@triton.jit
def _merge_kernel(o_ptr, lse_ptr, out_ptr, out_stride_b, out_stride_h,
                  HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, USE_PDL: tl.constexpr):
    """The separate merge launch of ``separate_merge=True`` (the earlier form, kept as it was),
    grid (batch, q_heads)."""
    enter_dependent(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = (b.to(tl.int64) * tl.num_programs(1) + h) * NUM_SPLITS
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    lse = tl.load(lse_ptr + row + splits)
    top = tl.max(lse, axis=0)
    weights = tl.where(lse > float("-inf"), tl.exp(lse - top), 0.0)
    o = tl.load(o_ptr + (row + splits)[:, None] * HEAD_DIM + dims[None, :])
    merged = tl.sum(o * weights[:, None], axis=0) / tl.sum(weights, axis=0)
    tl.store(out_ptr + b.to(tl.int64) * out_stride_b + h * out_stride_h + dims,
             merged.to(out_ptr.dtype.element_ty))


def decode_attention(
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
    block: int = BLOCK_N,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    rope: Optional[DecodeRope] = None,
    kv_settled: bool = False,
) -> torch.Tensor:
    """Attention of one query token per sequence over its KV slots.

    q [B, Hq, D]; k_buf / v_buf [slots, Hkv, D] (dense last two dims); req_to_token [R, C] int32;
    req_pool_indices [B]; seq_lens [B] (each >= 1, counting the token being decoded, whose K/V
    are already stored). Returns [B, Hq, D] in q's dtype. ``window_left`` >= 0 limits each query
    to the keys at positions [len - 1 - window_left, len - 1].

    counters: int32, at least B * Hkv elements, all zero (``arrival_counters``); used when
    num_splits > 1 and left at zero again. Pass one long-lived buffer (a CUDA graph must see the
    same one at every replay); None allocates zeros for this call, which costs a fill launch.
    Calls that may overlap (other streams) need buffers of their own. separate_merge: merge
    the splits in a second launch instead (the earlier form, for comparison; no counters).
    block / num_warps / num_stages: KV tokens per inner step and the launch's warps and
    pipeline stages (scripts/tune_triton_decode.py sweeps them).

    rope: q (and ``rope.k``) are the new tokens' projections before their per-head norm and
    rotary embedding, which the kernel applies (pymllm.layers.attention.decode_rope); it also
    stores the new K/V at ``rope.out_cache_loc``, so seq_lens count that token but the pool
    need not hold it yet. Its position in each sequence is seq_len - 1.

    kv_settled (with rope): the pool rows of the cached tokens were written before the kernels
    that may run alongside this one began (a decode graph: earlier steps wrote them, and this
    kernel stores the step's own K/V), so each program loads its slice's first PRELOAD_BLOCKS
    K/V blocks, as one tile, before its PDL wait. Not for a call right after kernels that write
    those rows: a PDL launch may start before their writes are visible.
    """
    op = "decode_attention"
    batch, _, head_dim = q.shape
    num_kv_heads, group = check_attention_args(op, q, k_buf, v_buf, num_splits)
    if rope is not None:
        check_decode_rope(op, q, k_buf, rope)
    out = output_for(op, q, out)
    if batch == 0:
        return out
    fused = num_splits > 1 and not separate_merge
    o_part, lse_part = split_scratch(q, num_splits, out)
    counters = arrival_counters_for(op, fused, counters, batch, num_kv_heads, out)
    rope_args = rope_kernel_args(rope, out)
    _partial_kernel[(batch, num_kv_heads, num_splits)](
        q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, o_part, lse_part, out, counters,
        *rope_args.pointers,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), req_to_token.stride(0),
        out.stride(0), out.stride(1), *rope_args.strides, sm_scale, window_left, rope_args.eps,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        NUM_SPLITS=num_splits, BLOCK=block, FUSED_MERGE=fused, MERGE_ROWS=triton.next_power_of_2(group),
        PREFETCH_TOKENS=PREFETCH_BLOCKS * block, LINE_ELEMS=prefetch_line_elems(head_dim, k_buf.element_size()),
        ROPE=rope is not None, APPLY_NORM=rope is not None and rope.q_weight is not None,
        PRELOAD_BLOCKS=PRELOAD_BLOCKS if kv_settled and rope is not None else 0,
        num_warps=num_warps, num_stages=num_stages, **launch_options(q.device, batch),
    )
    if num_splits > 1 and not fused:
        merge_splits(o_part, lse_part, out, num_splits)
    return out
