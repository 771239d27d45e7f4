"""The ``weight_shape`` tensor compressed-tensors saves next to packed weights: checked, not kept."""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch
from torch import nn

from pymllm.layers.utils import set_weight_attrs


def _check_weight_shape(
    layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, shard_id: Optional[Union[str, int]] = None
) -> None:
    _, rows = layer.shard_offsets[shard_id]
    expected = (rows, layer.input_size)
    got = tuple(int(v) for v in loaded.reshape(-1).tolist())
    if got != expected:
        raise ValueError(
            f"{layer.prefix}: checkpoint weight_shape {got} (shard {shard_id!r}) does not match the layer's {expected}"
        )


def register_weight_shape(layer: nn.Module) -> None:
    """A placeholder parameter whose loader validates the checkpoint's [rows, cols] per shard."""
    param = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
    set_weight_attrs(param, {"weight_loader": functools.partial(_check_weight_shape, layer)})
    layer.register_parameter("weight_shape", param)
