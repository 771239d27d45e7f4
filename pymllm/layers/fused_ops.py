"""Dispatchers for small fused ops: a fast kernel where it is available, else PyTorch.

Each op has one entry point used by the layers. A capability check decides, per call, whether
the Triton kernel in pymllm.layers.kernels may run; otherwise the reference implementation
runs. The reference is also the oracle in the tests.

Fast path contract (all ops):
- CUDA tensors in float16 or bfloat16, every operand on one device with one dtype, and the
  layout the kernel assumes (contiguous rows; for q/k, contiguous heads).
- Inputs are never written: outputs are new tensors, so a caller that keeps using ``x`` or
  ``residual`` after a call sees the values it passed in.
- Results equal the reference up to one unit in the last place of the activation dtype (the
  kernels round where the reference rounds; only float32 reduction order differs).
- Writes into the KV cache (qk_norm_rope with a KVCacheWrite) are bit for bit the rows the
  backend's own store would write from the op's outputs.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from pymllm.layers.layernorm import rms_norm_reference
from pymllm.layers.rotary_embedding import RotaryEmbedding

if TYPE_CHECKING:
    from pymllm.layers.layernorm import RMSNorm

FAST_DTYPES = (torch.float16, torch.bfloat16)
MAX_NORM_COLS = 16384  # one program holds a whole row in registers
MAX_ROPE_HEAD_DIM = 512


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Triton is installed and imports (cached: every fast-path check of every op asks)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _same_device_and_dtype(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return all(t.device == first.device and t.dtype == first.dtype for t in tensors)


def can_use_fast_path(*tensors: torch.Tensor) -> bool:
    """The checks every fused kernel shares: CUDA, float16/bfloat16, one device, one dtype."""
    first = tensors[0]
    return (
        first.device.type == "cuda"
        and first.dtype in FAST_DTYPES
        and _same_device_and_dtype(*tensors)
        and triton_available()
    )


def rms_norm_supported(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor] = None) -> bool:
    operands = (x, weight) if residual is None else (x, weight, residual)
    if not can_use_fast_path(*operands):
        return False
    if residual is not None and (residual.shape != x.shape or not residual.is_contiguous()):
        return False
    n = x.shape[-1]
    return x.is_contiguous() and weight.is_contiguous() and weight.shape == (n,) and 0 < n <= MAX_NORM_COLS


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if rms_norm_supported(x, weight):
        from pymllm.layers.kernels import norm_act_triton

        return norm_act_triton.rms_norm(x, weight, eps)[0]
    return rms_norm_reference(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); x and residual are left untouched.

    FlashInfer's fused_add_rmsnorm would overwrite both inputs in place; new outputs cost an
    allocation from the caching allocator but no extra memory traffic.
    """
    if rms_norm_supported(x, weight, residual):
        from pymllm.layers.kernels import norm_act_triton

        return norm_act_triton.rms_norm(x, weight, eps, residual=residual)
    residual = x + residual
    return rms_norm_reference(residual, weight, eps), residual


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * d] holding (gate, up) -> silu(gate) * up."""
    if can_use_fast_path(x) and x.is_contiguous() and x.shape[-1] % 2 == 0:
        from pymllm.layers.kernels import norm_act_triton

        return norm_act_triton.silu_and_mul(x)
    return silu_and_mul_reference(x)


class KVCacheWrite(NamedTuple):
    """Where qk_norm_rope also stores the layer's new K/V: ``k_cache[out_cache_loc[t]] = k[t]``
    (k after norm and rope) and ``v_cache[out_cache_loc[t]] = v[t]``."""

    v: torch.Tensor  # [T, Hk, D], untouched by the op
    k_cache: torch.Tensor  # [num_slots, Hk, D]: the layer's pool buffers
    v_cache: torch.Tensor
    out_cache_loc: torch.Tensor  # [T] int32 or int64 slot ids


def _rope_fast_path_ok(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    rotary_emb: RotaryEmbedding,
    q_norm: Optional["RMSNorm"],
    k_norm: Optional["RMSNorm"],
) -> bool:
    # Subclasses (e.g. multimodal rope) may change forward(); only the plain table lookup fuses.
    if type(rotary_emb) is not RotaryEmbedding or (q_norm is None) != (k_norm is None):
        return False
    operands = [q, k] if q_norm is None else [q, k, q_norm.weight, k_norm.weight]
    if not can_use_fast_path(*operands):
        return False
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        return False
    head_dim = q.shape[2]
    if head_dim % 2 or head_dim > MAX_ROPE_HEAD_DIM or q.stride(2) != 1 or k.stride(2) != 1:
        return False
    if (q.shape[1] > 1 and q.stride(1) != head_dim) or (k.shape[1] > 1 and k.stride(1) != head_dim):
        return False
    cos, sin = rotary_emb.cos_cached, rotary_emb.sin_cached
    if cos.dtype != torch.float32 or cos.shape[-1] * 2 != head_dim or not (cos.is_contiguous() and sin.is_contiguous()):
        return False
    if cos.device != q.device or positions.device != q.device:
        return False
    if q_norm is not None:
        if q_norm.weight.shape != (head_dim,) or k_norm.weight.shape != (head_dim,):
            return False
        if q_norm.variance_epsilon != k_norm.variance_epsilon:  # the kernel takes one eps
            return False
    return positions.dim() == 1 and positions.shape[0] == q.shape[0] and not positions.dtype.is_floating_point


def _kv_write_fast_path_ok(k: torch.Tensor, kv_write: KVCacheWrite) -> bool:
    """Layouts the kernel's cache write takes, given that k already passed _rope_fast_path_ok."""
    v, k_cache, v_cache, loc = kv_write
    # One dtype for k, v and both caches: the kernel stores k's rounded values without a
    # conversion, so an fp8 (or any other) KV pool keeps the backend's own store.
    if not _same_device_and_dtype(k, v, k_cache, v_cache):
        return False
    heads, head_dim = k.shape[1], k.shape[2]
    if v.shape != k.shape or v.stride(2) != 1 or (heads > 1 and v.stride(1) != head_dim):
        return False
    for cache in (k_cache, v_cache):
        # Each slot's [Hk, D] block dense: the kernel addresses a row as slot * stride(0) + offset.
        if cache.dim() != 3 or cache.shape[1] != heads or cache.shape[2] != head_dim or cache.stride(2) != 1:
            return False
        if heads > 1 and cache.stride(1) != head_dim:
            return False
    if k_cache.shape[0] != v_cache.shape[0]:
        return False
    return (
        loc.dim() == 1
        and loc.shape[0] == k.shape[0]
        and loc.dtype in (torch.int32, torch.int64)
        and loc.is_contiguous()
        and loc.device == k.device
    )


def qk_norm_rope_supported(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    rotary_emb: RotaryEmbedding,
    q_norm: Optional["RMSNorm"],
    k_norm: Optional["RMSNorm"],
    kv_write: Optional[KVCacheWrite] = None,
) -> bool:
    """Whether the Triton kernel runs for these operands (including the KV write, if given)."""
    if not _rope_fast_path_ok(q, k, positions, rotary_emb, q_norm, k_norm):
        return False
    return kv_write is None or _kv_write_fast_path_ok(k, kv_write)


def _qk_norm_rope_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    rotary_emb: RotaryEmbedding,
    q_norm: Optional["RMSNorm"],
    k_norm: Optional["RMSNorm"],
    kv_write: Optional[KVCacheWrite],
) -> Tuple[torch.Tensor, torch.Tensor]:
    from pymllm.layers.kernels import qk_norm_rope_triton

    cache_args = {} if kv_write is None else kv_write._asdict()
    return qk_norm_rope_triton.qk_norm_rope(
        q, k, positions, rotary_emb.cos_cached, rotary_emb.sin_cached,
        q_norm.weight if q_norm is not None else None,
        k_norm.weight if k_norm is not None else None,
        q_norm.variance_epsilon if q_norm is not None else 0.0,
        **cache_args,
    )


def _qk_norm_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    rotary_emb: RotaryEmbedding,
    q_norm: Optional["RMSNorm"],
    k_norm: Optional["RMSNorm"],
) -> Tuple[torch.Tensor, torch.Tensor]:
    if q_norm is not None:
        q = q_norm(q)
        k = k_norm(k)
    return rotary_emb(positions, q, k)


def store_kv_reference(k: torch.Tensor, kv_write: KVCacheWrite) -> None:
    """``k_cache[loc] = k``, ``v_cache[loc] = v`` in the caches' dtype, as KVPool.set_kv does."""
    loc = kv_write.out_cache_loc.long()  # index_put_ wants int64 indices on older torch
    kv_write.k_cache[loc] = k.to(kv_write.k_cache.dtype)
    kv_write.v_cache[loc] = kv_write.v.to(kv_write.v_cache.dtype)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    rotary_emb: RotaryEmbedding,
    q_norm: Optional["RMSNorm"] = None,
    k_norm: Optional["RMSNorm"] = None,
    kv_write: Optional[KVCacheWrite] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Optional per-head RMSNorm of q [T, Hq, D] and k [T, Hk, D], then rotary embedding.

    Reference: ``q_norm(q)``, ``k_norm(k)``, then ``rotary_emb(positions, q, k)``. With
    ``kv_write`` the returned k and the given v are also stored at ``out_cache_loc`` (in the
    same kernel on the fast path, with index assignment otherwise).
    """
    if qk_norm_rope_supported(q, k, positions, rotary_emb, q_norm, k_norm, kv_write):
        return _qk_norm_rope_triton(q, k, positions, rotary_emb, q_norm, k_norm, kv_write)
    q, k = _qk_norm_rope_reference(q, k, positions, rotary_emb, q_norm, k_norm)
    if kv_write is not None:
        store_kv_reference(k, kv_write)
    return q, k


def qk_norm_rope_try_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    rotary_emb: RotaryEmbedding,
    q_norm: Optional["RMSNorm"],
    k_norm: Optional["RMSNorm"],
    kv_write: Optional[KVCacheWrite],
) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """qk_norm_rope that stores K/V only where that saves a launch: returns (q, k, stored).

    For layers whose attention backend stores K/V itself: when the fused kernel can run, it
    also writes the cache and ``stored`` is True (the caller then tells attention not to
    store). Otherwise nothing is written and the backend's store (mllm_kernel's store_cache
    on the GPU, KVPool.set_kv elsewhere) runs as before. Each capability check runs once.
    """
    if not _rope_fast_path_ok(q, k, positions, rotary_emb, q_norm, k_norm):
        return (*_qk_norm_rope_reference(q, k, positions, rotary_emb, q_norm, k_norm), False)
    if kv_write is not None and _kv_write_fast_path_ok(k, kv_write):
        return (*_qk_norm_rope_triton(q, k, positions, rotary_emb, q_norm, k_norm, kv_write), True)
    return (*_qk_norm_rope_triton(q, k, positions, rotary_emb, q_norm, k_norm, None), False)


def float_logits_argmax_reference(
    logits: torch.Tensor, feed: Optional[torch.Tensor] = None, mirror: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    # The argmax of the model-dtype logits is that of their exact float32 copy (first index on
    # ties in both) and reads half the bytes.
    ids = torch.argmax(logits, dim=-1)
    rows = ids.numel()
    if feed is not None:
        feed[:rows].copy_(ids)
    if mirror is not None:
        ring, slot = mirror
        ring[int(slot)][:rows].copy_(ids)  # the slot as it is now, as the kernel reads it
    return logits.float(), ids


def float_logits_argmax(
    logits: torch.Tensor, counters: Optional[torch.Tensor] = None, feed: Optional[torch.Tensor] = None,
    mirror: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, their argmax per row) of model-dtype logits [rows, vocab]: the end of a
    decode step. ``counters``: the kernel's reusable arrival counters
    (``logits_argmax_triton.arrival_counters``); pass them inside a CUDA graph capture.
    ``feed`` / ``mirror``: further destinations of the ids (see logits_argmax_triton)."""
    if can_use_fast_path(logits) and logits.dim() == 2 and logits.stride(1) == 1:
        from pymllm.layers.kernels import logits_argmax_triton

        return logits_argmax_triton.float_logits_argmax(logits, counters, feed, mirror)
    return float_logits_argmax_reference(logits, feed, mirror)


def embedding_deferred_norm_reference(
    input_ids: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = F.embedding(input_ids, weight)
    hf = h.float()
    return (norm_weight.float() * hf).to(h.dtype), h, hf.pow(2).sum(dim=-1, keepdim=True)


def embedding_deferred_norm(
    input_ids: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``norm_weight * h``, h, float32 partial sums of h^2 per row) for h = ``weight[input_ids]``:
    the embedding as the producer of the first layer's deferred RMSNorm (one kernel on the GPU,
    pymllm.layers.kernels.embedding_norm_triton)."""
    if (can_use_fast_path(weight, norm_weight) and input_ids.device == weight.device and input_ids.dim() == 1
            and input_ids.is_contiguous() and weight.stride(1) == 1 and norm_weight.is_contiguous()):
        from pymllm.layers.kernels import embedding_norm_triton

        return embedding_norm_triton.embedding_deferred_norm(input_ids, weight, norm_weight)
    return embedding_deferred_norm_reference(input_ids, weight, norm_weight)


def row_logsumexp_reference(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1)


def row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """float32 logsumexp of each row of logits [rows, vocab], read once (the normaliser of their
    log_softmax). Float32 rows take the kernel too: the sampler's logits are a float32 copy."""
    on_gpu = logits.device.type == "cuda" and logits.dtype in (*FAST_DTYPES, torch.float32) and triton_available()
    if on_gpu and logits.dim() == 2 and logits.stride(1) == 1:
        from pymllm.layers.kernels import logsumexp_triton

        return logsumexp_triton.row_logsumexp(logits)
    return row_logsumexp_reference(logits)
