"""Capability checks shared by the quantized-kernel dispatchers (cached: they run per forward)."""

from __future__ import annotations

import functools
from typing import Tuple

import torch

from pymllm.layers.fused_ops import triton_available  # noqa: F401  (one check for every dispatcher)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def cuda_capability(device: torch.device) -> Tuple[int, int]:
    """(major, minor) of a CUDA device; (0, 0) for any other device."""
    if device.type != "cuda":
        return (0, 0)
    return _capability(device.index if device.index is not None else torch.cuda.current_device())

