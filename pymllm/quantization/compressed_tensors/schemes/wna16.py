"""W4A16: 4-bit integer weights (``pack-quantized``), group-wise or channel-wise, symmetric or
with zero points; activations stay fp16/bf16.

Checkpoint: ``weight_packed`` int32 [N, K/8], ``weight_scale`` [N, K/G], ``weight_shape``
[2], and for asymmetric schemes ``weight_zero_point`` int32 [N/8, K/G] (packed along N).
``process_weights_after_loading`` repacks them once into the kernel layout (see
``kernels.w4a16``); ``apply`` only runs the GEMM. A stacked gate/up layer also has
``apply_swiglu``: at decode sizes the GEMV with the SiLU-and-mul as its epilogue. At one row the
layer also produces or consumes a deferred RMSNorm (``pymllm.layers.deferred_norm``).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from pymllm.layers.utils import set_weight_attrs
from pymllm.quantization.compressed_tensors.schemes.base import CompressedTensorsScheme, replace_parameter
from pymllm.quantization.compressed_tensors.schemes.shape_check import register_weight_shape
from pymllm.quantization.kernels.w4a16 import (
    prepare_w4a16_gemm, prepare_w4a16_gemv, repack_wna16, w4a16_add_norm, w4a16_linear, w4a16_normed, w4a16_swiglu,
    w4a16_takes_deferred_norm,
)

PACK_FACTOR = 8  # int4 values per int32
W4A16_ATTENTION_SPLITS = 16  # see WNA16Scheme.one_row_attention_split_cap


class WNA16Scheme(CompressedTensorsScheme):
    def __init__(self, group_size: Optional[int], symmetric: bool):
        self.group_size = group_size  # None: one scale per output channel
        self.symmetric = symmetric
        self.group = 0  # resolved in create_weights (K for channel-wise)
        self.params_dtype = torch.float32
        self.gate_up = False  # two equal stacked outputs (a gated MLP's gate/up): the gated GEMV applies

    def create_weights(
        self, layer: nn.Module, input_size: int, output_partition_sizes: List[int], params_dtype: torch.dtype
    ) -> None:
        self.group = self.group_size or input_size
        self.params_dtype = params_dtype
        if input_size % PACK_FACTOR or input_size % self.group:
            raise ValueError(
                f"{layer.prefix}: input size {input_size} must be a multiple of {PACK_FACTOR} and of the "
                f"group size {self.group} for 4-bit packed weights"
            )
        if not self.symmetric and any(size % PACK_FACTOR for size in output_partition_sizes):
            raise ValueError(
                f"{layer.prefix}: output sizes {output_partition_sizes} must be multiples of {PACK_FACTOR} "
                "for packed zero points"
            )
        rows = sum(output_partition_sizes)
        self.gate_up = len(output_partition_sizes) == 2 and output_partition_sizes[0] == output_partition_sizes[1]
        groups = input_size // self.group
        packed = nn.Parameter(torch.empty(rows, input_size // PACK_FACTOR, dtype=torch.int32), requires_grad=False)
        set_weight_attrs(packed, {"output_dim": 0, "input_dim": 1, "weight_loader": layer.weight_loader})
        layer.register_parameter("weight_packed", packed)
        scale = nn.Parameter(torch.empty(rows, groups, dtype=params_dtype), requires_grad=False)
        set_weight_attrs(scale, {"output_dim": 0, "input_dim": 1, "weight_loader": layer.weight_loader})
        layer.register_parameter("weight_scale", scale)
        if not self.symmetric:
            zero = nn.Parameter(torch.empty(rows // PACK_FACTOR, groups, dtype=torch.int32), requires_grad=False)
            set_weight_attrs(
                zero,
                {"output_dim": 0, "output_pack_factor": PACK_FACTOR, "weight_loader": layer.weight_loader},
            )
            layer.register_parameter("weight_zero_point", zero)
        register_weight_shape(layer)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        zero_point = None if self.symmetric else layer.weight_zero_point.data
        qweight, scales, zeros = repack_wna16(
            layer.weight_packed.data, layer.weight_scale.data, zero_point, self.params_dtype
        )
        replace_parameter(layer, "weight_packed", qweight)
        replace_parameter(layer, "weight_scale", scales)
        if zeros is not None:
            replace_parameter(layer, "weight_zero_point", zeros)
        delattr(layer, "weight_shape")
        # Decode GEMV and batch GEMM: JIT build + self-test + workspace now, not in the first
        # request or capture.
        prepare_w4a16_gemv(qweight.device, self.params_dtype, zeros is not None)
        prepare_w4a16_gemm(qweight.device, self.params_dtype, zeros is not None)
        if self.gate_up:
            prepare_w4a16_gemv(qweight.device, self.params_dtype, zeros is not None, gated=True)

    def jit_kernels(self, device, dtype):
        from pymllm.layers.kernels.jit_prebuild import w4a16_builds

        return w4a16_builds(device, dtype, with_zeros=not self.symmetric, gated=self.gate_up)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        zeros = None if self.symmetric else layer.weight_zero_point
        out = w4a16_linear(x2d, layer.weight_packed, layer.weight_scale, zeros, self.group, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def apply_swiglu(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if not self.gate_up:
            return None
        x2d = x.reshape(-1, x.shape[-1])
        zeros = None if self.symmetric else layer.weight_zero_point
        out = w4a16_swiglu(x2d, layer.weight_packed, layer.weight_scale, zeros, self.group, bias)
        return None if out is None else out.reshape(*x.shape[:-1], out.shape[-1])

    def _zeros(self, layer: nn.Module) -> Optional[torch.Tensor]:
        return None if self.symmetric else layer.weight_zero_point

    def takes_deferred_norm(self, layer: nn.Module, like: torch.Tensor, gated: bool) -> bool:
        if gated and not self.gate_up:
            return False
        return w4a16_takes_deferred_norm(like, layer.input_size, layer.weight_scale, self._zeros(layer), gated)

    def apply_add_norm(self, layer, x, residual, norm_weight, eps, bias):
        return w4a16_add_norm(x, layer.weight_packed, layer.weight_scale, self._zeros(layer), self.group, bias,
                              residual, norm_weight, eps)

    def one_row_attention_split_cap(self, layer: nn.Module) -> Optional[int]:
        # The one-row W4A16 GEMV behind the attention runs faster after 16 splits than after 32
        # (H100, Qwen3-8B bs1 in1024, processes alternating, run T141: 2.290 / 2.297 against 2.365 /
        # 2.366 ms; H200 T139: 1.927 / 1.937 at 16 against 1.967 / 1.970 at 32), where every other
        # format gains from 32. Likely cause: its 16-warp blocks, which copy their first weights
        # before their PDL wait, find fewer SMs free of attention programs.
        return W4A16_ATTENTION_SPLITS

    def apply_normed(self, layer, pending, bias, gated):
        if gated and not self.gate_up:
            return None
        return w4a16_normed(pending, layer.weight_packed, layer.weight_scale, self._zeros(layer), self.group, bias,
                            gated)
