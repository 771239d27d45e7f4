"""Small helpers shared by layers."""

from __future__ import annotations

from typing import Any, Dict

import torch


def set_weight_attrs(param: torch.Tensor, attrs: Dict[str, Any]) -> None:
    """Attach loader metadata (weight_loader, output_dim, ...) to a parameter."""
    for key, value in attrs.items():
        setattr(param, key, value)
