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
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING, Optional, Tuple

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


def qk_norm_rope_supported(
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


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    rotary_emb: RotaryEmbedding,
    q_norm: Optional["RMSNorm"] = None,
    k_norm: Optional["RMSNorm"] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Optional per-head RMSNorm of q [T, Hq, D] and k [T, Hk, D], then rotary embedding.

    Reference: ``q_norm(q)``, ``k_norm(k)``, then ``rotary_emb(positions, q, k)``.
    """
    if qk_norm_rope_supported(q, k, positions, rotary_emb, q_norm, k_norm):
        from pymllm.layers.kernels import qk_norm_rope_triton

        return qk_norm_rope_triton.qk_norm_rope(
            q, k, positions, rotary_emb.cos_cached, rotary_emb.sin_cached,
            q_norm.weight if q_norm is not None else None,
            k_norm.weight if k_norm is not None else None,
            q_norm.variance_epsilon if q_norm is not None else 0.0,
        )
    if q_norm is not None:
        q = q_norm(q)
        k = k_norm(k)
    return rotary_emb(positions, q, k)
