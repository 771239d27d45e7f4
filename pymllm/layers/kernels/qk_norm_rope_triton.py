"""Triton kernel: per-head q/k RMSNorm (Qwen3) and rotary embedding in one pass over q and k.

One program handles one head of one token (decode) or of a tile of tokens (prefill): it reads
the head once, normalises it (optional), rotates it with the cos/sin row of the token's position
and writes it once. The reference
does the same in about fifteen elementwise PyTorch ops per tensor, each a kernel launch and
a round trip through memory; in a small-batch decode step those launches dominate.

Rounding follows the reference ops (pymllm.layers.layernorm.rms_norm_reference, then
pymllm.layers.rotary_embedding.apply_rotary with cos/sin cast to the activation dtype): every
product and sum is rounded to the activation dtype where PyTorch rounds it. FlashInfer's
rope kernels keep cos/sin and the products in float32, which differs from the reference by
more than one rounding step, and they do not fuse the norm.

Layout: rotate-half (NeoX) with the rotary dimension equal to head_dim; q and k may be
strided views of a fused QKV output as long as each head's elements are contiguous.

Optional KV-cache write: given the layer's pool buffers and the new tokens' slots, the k
programs also store their result and the token's v head at ``k_cache[loc[t]]`` /
``v_cache[loc[t]]``. This replaces the attention backend's separate store kernel, one launch
per layer. The rows written are bit for bit what that store would write from the returned k
(the same rounded values, in the same dtype) and from v (copied without conversion).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from pymllm.layers.kernels.pdl import enter_dependent, launch_options


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr,
    v_ptr, k_cache_ptr, v_cache_ptr, loc_ptr,
    q_tok_stride, q_head_stride, k_tok_stride, k_head_stride,
    v_tok_stride, v_head_stride, k_cache_slot_stride, v_cache_slot_stride,
    num_tokens, num_q_heads, num_k_heads, eps,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, TOKENS: tl.constexpr,
    APPLY_NORM: tl.constexpr, WRITE_KV: tl.constexpr, USE_PDL: tl.constexpr,
):
    enter_dependent(USE_PDL)
    # One program: one head of TOKENS consecutive tokens, a [TOKENS, HALF] tile per half.
    toks = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    tok_ok = toks < num_tokens
    head = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, HALF_BLOCK)
    col_ok = offs < HALF
    mask = tok_ok[:, None] & col_ok[None, :]
    dtype = q_out_ptr.dtype.element_ty
    # Heads [0, num_q_heads) are q's, the rest are k's: one launch covers both tensors.
    if head < num_q_heads:
        src = q_ptr + toks[:, None] * q_tok_stride + head * q_head_stride
        dst = q_out_ptr + (toks[:, None] * num_q_heads + head) * HEAD_DIM
        w_ptr = qw_ptr
    else:
        kh = head - num_q_heads
        src = k_ptr + toks[:, None] * k_tok_stride + kh * k_head_stride
        dst = k_out_ptr + (toks[:, None] * num_k_heads + kh) * HEAD_DIM
        w_ptr = kw_ptr
    x1 = tl.load(src + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    if APPLY_NORM:
        var = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM
        rstd = tl.rsqrt(var + eps)[:, None]
        w1 = tl.load(w_ptr + offs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + offs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        x1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    pos = tl.load(pos_ptr + toks, mask=tok_ok, other=0).to(tl.int64)
    c = tl.load(cos_ptr + pos[:, None] * HALF + offs[None, :], mask=mask, other=0.0).to(dtype).to(tl.float32)
    s = tl.load(sin_ptr + pos[:, None] * HALF + offs[None, :], mask=mask, other=0.0).to(dtype).to(tl.float32)
    o1 = ((x1 * c).to(dtype).to(tl.float32) - (x2 * s).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)).to(dtype)
    tl.store(dst + offs[None, :], o1, mask=mask)
    tl.store(dst + HALF + offs[None, :], o2, mask=mask)
    if WRITE_KV:
        if head >= num_q_heads:
            # k and v have the same heads: the program of k head kh also moves v head kh, so
            # v needs no programs of its own. Each slot's [H_kv, D] block is dense (checked in
            # pymllm.layers.fused_ops); only the slot stride varies.
            kh = head - num_q_heads
            slot = tl.load(loc_ptr + toks, mask=tok_ok, other=0).to(tl.int64)
            k_row = k_cache_ptr + slot[:, None] * k_cache_slot_stride + kh * HEAD_DIM
            # The cache has the activation dtype (checked by the dispatcher): these are the
            # very values stored in k_out above.
            tl.store(k_row + offs[None, :], o1, mask=mask)
            tl.store(k_row + HALF + offs[None, :], o2, mask=mask)
            # v is copied as loaded: no float32 round trip, so every bit pattern survives.
            v_src = v_ptr + toks[:, None] * v_tok_stride + kh * v_head_stride
            v_row = v_cache_ptr + slot[:, None] * v_cache_slot_stride + kh * HEAD_DIM
            tl.store(v_row + offs[None, :], tl.load(v_src + offs[None, :], mask=mask), mask=mask)
            tl.store(v_row + HALF + offs[None, :], tl.load(v_src + HALF + offs[None, :], mask=mask), mask=mask)


@triton.jit
def norm_rope_rows(row_ptrs, row_ok, dims, partner, w, w_partner, cos, sin_signed, eps,
                   HEAD_DIM: tl.constexpr, APPLY_NORM: tl.constexpr, dtype: tl.constexpr):
    """Whole heads through the kernel above's norm + rope, as [R, HEAD_DIM] tiles (for kernels
    that consume the heads in registers, such as decode attention). ``row_ptrs`` [R]: each
    head's first element; ``partner`` [HEAD_DIM]: the rotate-half partner of each column,
    (d + HEAD_DIM / 2) % HEAD_DIM; ``w`` / ``w_partner``: the norm weight at the columns and at
    their partners (float32); ``cos`` [HEAD_DIM]: the position's cos at d % (HEAD_DIM / 2),
    rounded to ``dtype`` and back; ``sin_signed``: likewise for sin, negated in the first half.

    Every product is rounded where the kernel above rounds it, so column d < HEAD_DIM / 2 is its
    o1 = (x1 c) - (x2 s) and the others its o2 = (x2 c) + (x1 s): rounding to nearest is
    symmetric, so adding the rounded (x2 * -s) subtracts the rounded (x2 s). Only the norm's sum
    of squares runs in another order (one sum over the head instead of one per half)."""
    x = tl.load(row_ptrs[:, None] + dims[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    xp = tl.load(row_ptrs[:, None] + partner[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    if APPLY_NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        x = (w[None, :] * (x * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        xp = (w_partner[None, :] * (xp * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return ((x * cos[None, :]).to(dtype).to(tl.float32) + (xp * sin_signed[None, :]).to(dtype).to(tl.float32)).to(dtype)


# Tokens per program: one for decode-sized launches (the lowest latency); a tile of 16 for
# prefill, where one-warp programs of a single (token, head) held the kernel at about a quarter of
# the memory bandwidth (H200, Qwen3-8B, 2048 tokens: 51 us per layer for ~50 MB moved).
PREFILL_TOKENS_PER_PROGRAM = 16
_TILE_FROM_TOKENS = 64


def tokens_per_program(tokens: int) -> int:
    """Tokens one program of the kernel handles for a launch over ``tokens`` tokens."""
    return 1 if tokens < _TILE_FROM_TOKENS else PREFILL_TOKENS_PER_PROGRAM


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    q_weight: Optional[torch.Tensor] = None,
    k_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    q_out: Optional[torch.Tensor] = None,
    k_out: Optional[torch.Tensor] = None,
    *,
    v: Optional[torch.Tensor] = None,
    k_cache: Optional[torch.Tensor] = None,
    v_cache: Optional[torch.Tensor] = None,
    out_cache_loc: Optional[torch.Tensor] = None,
    tokens_per_program_override: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hk, D] (last dim contiguous); positions: [T] int;
    cos_cache / sin_cache: float32 [max_position, D / 2]. Returns new contiguous (q, k).

    With q_weight / k_weight ([D], activation dtype) each head is RMS-normalised first.

    With k_cache / v_cache ([num_slots, Hk, D], k's dtype, each slot's [Hk, D] dense), v
    ([T, Hk, D], last dim contiguous) and out_cache_loc ([T] int32 or int64, contiguous), also
    ``k_cache[out_cache_loc] = returned k`` and ``v_cache[out_cache_loc] = v``. The caller
    (pymllm.layers.fused_ops) checks these layouts.

    ``tokens_per_program_override`` (a power of two) replaces ``tokens_per_program(T)``, for tests.
    """
    tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    q_out = torch.empty((tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty((tokens, num_k_heads, head_dim), dtype=k.dtype, device=k.device) if k_out is None else k_out
    if tokens == 0:
        return q_out, k_out
    apply_norm = q_weight is not None
    write_kv = k_cache is not None
    if write_kv and (v is None or v_cache is None or out_cache_loc is None):
        raise ValueError("the KV-cache write needs v, k_cache, v_cache and out_cache_loc together")
    half_block = triton.next_power_of_2(head_dim // 2)
    # Without the write the cache arguments are never read; any tensor fills their slots.
    cache_args = (v, k_cache, v_cache, out_cache_loc) if write_kv else (k, k, k, positions)
    cache_strides = (v.stride(0), v.stride(1), k_cache.stride(0), v_cache.stride(0)) if write_kv else (0, 0, 0, 0)
    per_program = tokens_per_program_override or tokens_per_program(tokens)
    warps = (1 if half_block <= 64 else 2) if per_program == 1 else 4
    _qk_norm_rope_kernel[(triton.cdiv(tokens, per_program), num_q_heads + num_k_heads)](
        q, k, q_out, k_out,
        q_weight if apply_norm else q, k_weight if apply_norm else k,
        cos_cache, sin_cache, positions,
        *cache_args,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        *cache_strides,
        tokens, num_q_heads, num_k_heads, eps,
        HEAD_DIM=head_dim, HALF=head_dim // 2, HALF_BLOCK=half_block, TOKENS=per_program, APPLY_NORM=apply_norm,
        WRITE_KV=write_kv, num_warps=warps, **launch_options(q.device, tokens),
    )
    return q_out, k_out
