"""Dispatchers for small fused ops: a fast kernel where it is available, else PyTorch.

Each op has one entry point used by the layers; the reference implementation is the fallback
and the oracle in tests.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from pymllm.layers.layernorm import rms_norm_reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_reference(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    residual = x + residual
    return rms_norm_reference(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * d] holding (gate, up) -> silu(gate) * up."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]
