"""Split-KV decode attention in Triton that reads the page table on the device: no host planning.

Why: inside a CUDA-graph decode step, FlashInfer's decode wrapper needs ``plan()`` on the host
before every replay (its split schedule depends on the sequence lengths), plus a kernel that
gathers ``kv_indices`` from ``req_to_token``. That host work (~0.2 ms) sits on the critical
path of every step, and for small batches the kernel pair itself takes ~8-10 us per layer on an
H200. These kernels take the lengths and the page table straight from the graph's static
device buffers, so a replay needs no host-side attention work at all.

Two launches per layer:
  1. ``_partial_kernel``, grid (batch, kv_heads, splits): each program walks its slice of one
     sequence's KV slots (looked up in ``req_to_token``) for all query heads of one KV head
     (the GQA group shares every K/V load) with an online softmax, and writes the slice's
     normalised output and log-sum-exp.
  2. ``_merge_kernel``, grid (batch, q_heads): combines the slices with their log-sum-exps.
The split count is fixed per batch size (a CUDA graph fixes the grid) and chosen to give the
GPU enough programs; a split with no tokens writes lse = -inf and drops out of the merge.

Numerics: scores and softmax in float32, P rounded to the KV dtype for the P @ V product on
tensor cores (as FlashInfer does), output rounded once.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK_N = 32  # KV tokens per inner step
_MAX_SPLITS = 32


def num_splits_for(batch_size: int, num_kv_heads: int, num_sms: int) -> int:
    """Splits per sequence so that batch * kv_heads * splits covers ~2 programs per SM."""
    want = triton.cdiv(2 * num_sms, max(1, batch_size * num_kv_heads))
    return max(1, min(_MAX_SPLITS, triton.next_power_of_2(want)))


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, req_to_token_ptr, req_idx_ptr, seq_lens_ptr, o_ptr, lse_ptr,
    q_stride_b, q_stride_h, kv_stride_s, kv_stride_h, r2t_stride,
    sm_scale, window_left,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * GROUP

    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    lo = tl.where(window_left >= 0, tl.maximum(seq_len - 1 - window_left, 0), 0)
    span = seq_len - lo
    chunk = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK) * BLOCK
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    rows = tl.arange(0, GROUP_PAD)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b.to(tl.int64) * q_stride_b + heads[:, None] * q_stride_h + dims[None, :],
                mask=row_ok[:, None], other=0.0)

    req_row = req_to_token_ptr + tl.load(req_idx_ptr + b).to(tl.int64) * r2t_stride
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    # log2 domain: exp2 is one instruction.
    qk_scale = sm_scale * 1.4426950408889634
    for n0 in range(start, end, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        tok_ok = offs < end
        slots = tl.load(req_row + offs, mask=tok_ok, other=0).to(tl.int64)
        kv_off = slots[:, None] * kv_stride_s + kv_head * kv_stride_h + dims[None, :]
        k = tl.load(k_ptr + kv_off, mask=tok_ok[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * qk_scale
        scores = tl.where(tok_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=tok_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out_row = (b.to(tl.int64) * num_q_heads + heads) * NUM_SPLITS + split
    has_tokens = end > start
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[:, None]
    tl.store(o_ptr + out_row[:, None] * HEAD_DIM + dims[None, :], o, mask=row_ok[:, None])
    # Natural-log lse of the slice; -inf marks an empty slice.
    lse = tl.where(has_tokens, (m_i + tl.log2(safe_l)) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + out_row, lse, mask=row_ok)


@triton.jit
def _merge_kernel(o_ptr, lse_ptr, out_ptr, out_stride_b, out_stride_h,
                  HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr):
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
) -> torch.Tensor:
    """Attention of one query token per sequence over its KV slots.

    q [B, Hq, D]; k_buf / v_buf [slots, Hkv, D] (dense last two dims); req_to_token [R, C] int32;
    req_pool_indices [B]; seq_lens [B] (each >= 1, counting the token being decoded, whose K/V
    are already stored). Returns [B, Hq, D] in q's dtype. ``window_left`` >= 0 limits each query
    to the keys at positions [len - 1 - window_left, len - 1].
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buf.shape[1]
    group = num_q_heads // num_kv_heads
    if group * num_kv_heads != num_q_heads:
        raise ValueError(f"decode_attention: {num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"decode_attention: head_dim must be a power of two >= 16, got {head_dim}")
    if num_splits & (num_splits - 1):
        raise ValueError(f"decode_attention: num_splits must be a power of two, got {num_splits}")
    for name, buf in (("k_buf", k_buf), ("v_buf", v_buf)):
        if buf.stride(2) != 1 or buf.stride(1) != head_dim:
            raise ValueError(f"decode_attention: {name} must be dense in its last two dims")
    if v_buf.stride() != k_buf.stride():
        raise ValueError("decode_attention: k_buf and v_buf must share strides")
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    o_part = torch.empty(batch * num_q_heads * num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(batch * num_q_heads * num_splits, dtype=torch.float32, device=q.device)
    _partial_kernel[(batch, num_kv_heads, num_splits)](
        q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, o_part, lse_part,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), req_to_token.stride(0),
        sm_scale, window_left,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        NUM_SPLITS=num_splits, BLOCK=BLOCK_N, num_warps=4, num_stages=2,
    )
    _merge_kernel[(batch, num_q_heads)](
        o_part, lse_part, out, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, NUM_SPLITS=num_splits, num_warps=4,
    )
    return out
