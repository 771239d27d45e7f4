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


def mrope_axis_of_frequency(mrope_section, half_dim: int, interleaved: bool = True) -> torch.Tensor:
    """Which position axis (0 = temporal, 1 = height, 2 = width) drives each rotary frequency.

    Interleaved layout (Qwen3-VL): frequency i belongs to height when i % 3 == 1 and
    i < 3 * section[1], to width when i % 3 == 2 and i < 3 * section[2], else to temporal.
    Contiguous layout (Qwen2-VL): the first section[0] frequencies are temporal, the next
    section[1] height, the rest width.
    """
    sections = [int(s) for s in mrope_section]
    if len(sections) != 3 or sum(sections) != half_dim:
        raise ValueError(f"mrope_section {sections} must have 3 entries summing to head_dim/2 = {half_dim}")
    axis = torch.zeros(half_dim, dtype=torch.long)
    if interleaved:
        for dim, offset in ((1, 1), (2, 2)):
            axis[offset : 3 * sections[dim] : 3] = dim
    else:
        axis[sections[0] : sections[0] + sections[1]] = 1
        axis[sections[0] + sections[1] :] = 2
    return axis


class MRotaryEmbedding(nn.Module):
    """Multimodal rotary embedding: positions [3, T] (temporal, height, width) pick their
    frequencies per ``mrope_section``; positions [T] are plain rope (all three axes equal).

    The cos/sin tables live in ``self.base`` (a plain RotaryEmbedding), so 1-D positions can go
    through the fused norm+rope kernel unchanged; only the 3-D case runs here.
    """

    def __init__(self, head_dim: int, max_position: int, hf_config, mrope_section, interleaved: bool = True):
        super().__init__()
        self.head_dim = head_dim
        self.base = RotaryEmbedding(head_dim, max_position, hf_config)
        self.register_buffer(
            "axis_of_freq", mrope_axis_of_frequency(mrope_section, head_dim // 2, interleaved), persistent=False
        )

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D/2] for positions [3, T]."""
        half = self.head_dim // 2
        index = self.axis_of_freq.view(1, 1, half).expand(1, positions.shape[1], half)
        cos = torch.gather(self.base.cos_cached[positions], 0, index)[0]
        sin = torch.gather(self.base.sin_cached[positions], 0, index)[0]
        return cos.to(dtype), sin.to(dtype)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return self.base(positions, q, k)
        cos, sin = self.cos_sin(positions, q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
