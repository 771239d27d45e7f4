"""The LinearMethod of compressed-tensors layers: it hands each lifecycle step to the scheme."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from pymllm.quantization.base import LinearMethodBase
from pymllm.quantization.compressed_tensors.schemes.base import CompressedTensorsScheme


class CompressedTensorsLinearMethod(LinearMethodBase):
    def __init__(self, scheme: CompressedTensorsScheme):
        self.scheme = scheme

    def create_weights(
        self, layer: nn.Module, input_size: int, output_partition_sizes: List[int], params_dtype: torch.dtype
    ) -> None:
        self.scheme.create_weights(layer, input_size, output_partition_sizes, params_dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.scheme.process_weights_after_loading(layer)

    def jit_kernels(self, layer, device, dtype):
        return self.scheme.jit_kernels(device, dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return self.scheme.apply(layer, x, bias)

    def apply_rmsnorm(self, layer, x, residual, norm_weight, eps, bias):
        return self.scheme.apply_rmsnorm(layer, x, residual, norm_weight, eps, bias)

    def apply_silu_mul(self, layer, x, bias):
        return self.scheme.apply_silu_mul(layer, x, bias)

    def apply_swiglu(self, layer, x, bias):
        return self.scheme.apply_swiglu(layer, x, bias)

    def takes_deferred_norm(self, layer, like, gated):
        return self.scheme.takes_deferred_norm(layer, like, gated)

    def apply_add_norm(self, layer, x, residual, norm_weight, eps, bias):
        return self.scheme.apply_add_norm(layer, x, residual, norm_weight, eps, bias)

    def apply_normed(self, layer, pending, bias, gated):
        return self.scheme.apply_normed(layer, pending, bias, gated)

    def one_row_attention_split_cap(self, layer):
        return self.scheme.one_row_attention_split_cap(layer)
