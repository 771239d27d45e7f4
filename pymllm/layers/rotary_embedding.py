"""Rotary position embedding (rotate-half convention of the HF reference models)."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


def _rope_parameters(hf_config) -> dict:
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        return dict(params)
    # Older transformers keep theta and scaling as separate attributes.
    params = dict(getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    return params


def compute_inv_freq(hf_config, head_dim: int) -> Tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, through transformers' own rope functions."""
    params = _rope_parameters(hf_config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = float(params["rope_theta"])
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return inv_freq.float(), float(scaling)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos/sin: [T, D/2] in x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, hf_config):
        super().__init__()
        self.head_dim = head_dim
        inv_freq, scaling = compute_inv_freq(hf_config, head_dim)
        t = torch.arange(max_position, dtype=torch.float)
        freqs = torch.outer(t, inv_freq)
        # float32 tables; cast to the activations' dtype per call like the reference does.
        self.register_buffer("cos_cached", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin_cached", freqs.sin() * scaling, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D]."""
        cos = self.cos_cached[positions].to(q.dtype)
        sin = self.sin_cached[positions].to(q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
