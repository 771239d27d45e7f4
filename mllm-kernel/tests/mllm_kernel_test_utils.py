"""Helpers shared by the kernel tests."""

from __future__ import annotations

import torch

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact equality of the stored bits, so NaN poison compares equal to itself."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    as_int = _SAME_SIZE_INT[actual.element_size()]
    mismatches = (actual.contiguous().view(as_int) != expected.contiguous().view(as_int)).sum().item()
    assert mismatches == 0, f"{mismatches} of {actual.numel()} elements differ"


def poisoned_like(tensor: torch.Tensor) -> torch.Tensor:
    """A copy filled with NaN (floats) or -1 (integers), so unwritten entries stand out."""
    value = float("nan") if tensor.is_floating_point() else -1
    return torch.full_like(tensor, value)
