"""Interfaces between linear layers and quantization formats.

QuantizationConfig parses the checkpoint's quantization config and picks a LinearMethod per
layer; the LinearMethod owns the layer's parameters, their one post-load layout conversion and
the forward.
"""

from __future__ import annotations

import abc
from typing import List, Optional

import torch
from torch import nn


class LinearMethodBase(abc.ABC):
    @abc.abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        input_size: int,
        output_partition_sizes: List[int],
        params_dtype: torch.dtype,
    ) -> None:
        """Register checkpoint-facing parameters on `layer` (with weight_loader attributes)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Convert checkpoint layout to kernel layout, once, after all weights are loaded."""

    @abc.abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The forward: y = x W^T (+ bias)."""


class QuantizationConfig(abc.ABC):
    @abc.abstractmethod
    def get_linear_method(self, prefix: str) -> Optional[LinearMethodBase]:
        """The method for the linear layer named `prefix`, or None to leave it unquantized."""
