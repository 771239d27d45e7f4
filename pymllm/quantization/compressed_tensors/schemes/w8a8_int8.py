"""W8A8 int8: per-channel symmetric int8 weights, dynamic per-token symmetric int8 activations.

Checkpoint (compressed-tensors ``int-quantized``): ``weight`` int8 [N, K], ``weight_scale``
[N, 1]. Runtime: the same bytes viewed as the column-major [K, N] operand of the int8 GEMM
and float32 scales [N]. Forward: quantize each token row to int8, then one int8 GEMM whose
epilogue applies both scales and the bias; decode batches of up to 8 rows may take mllm_kernel's
weight-streaming ``gemv_w8a8`` instead (same int32 products and epilogue) where it measures faster,
and once that is decided, its fused form that quantizes the rows itself and can also apply the
preceding RMSNorm or SiLU-and-mul (``fused_gemv``). Where that fused form is not chosen, the
RMSNorm or SiLU-and-mul in front of a layer quantizes its own output (one launch, not two).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from pymllm.layers.kernels.fused_gemv import prepare_fused_gemvs, w8a8_fused_linear
from pymllm.layers.kernels.gemv_dispatch import prepare_gemv, w8a8_gemv_or_none
from pymllm.layers.utils import set_weight_attrs
from pymllm.quantization.compressed_tensors.schemes.base import CompressedTensorsScheme, replace_parameter
from pymllm.quantization.kernels.int8_activation_triton import per_token_quant_int8, prologue_quant_int8
from pymllm.quantization.kernels.int8_scaled_mm import cutlass_builds, int8_scaled_mm, prepare_int8_scaled_mm


class W8A8Int8Scheme(CompressedTensorsScheme):
    def __init__(self) -> None:
        self.params_dtype = torch.float32  # the activation / output dtype, set in create_weights

    def create_weights(
        self, layer: nn.Module, input_size: int, output_partition_sizes: List[int], params_dtype: torch.dtype
    ) -> None:
        self.params_dtype = params_dtype
        rows = sum(output_partition_sizes)
        weight = nn.Parameter(torch.empty(rows, input_size, dtype=torch.int8), requires_grad=False)
        set_weight_attrs(weight, {"output_dim": 0, "input_dim": 1, "weight_loader": layer.weight_loader})
        layer.register_parameter("weight", weight)
        scale = nn.Parameter(torch.empty(rows, 1, dtype=torch.float32), requires_grad=False)
        set_weight_attrs(scale, {"output_dim": 0, "weight_loader": layer.weight_loader})
        layer.register_parameter("weight_scale", scale)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        # [N, K] row-major is already the column-major [K, N] the GEMM wants: a view, no copy.
        replace_parameter(layer, "weight", layer.weight.data.t())
        replace_parameter(layer, "weight_scale", layer.weight_scale.data.reshape(-1).float().contiguous())
        prepare_int8_scaled_mm(layer.weight.device, self.params_dtype)
        if prepare_gemv("w8a8", layer.weight.device, self.params_dtype):
            prepare_fused_gemvs("w8a8", layer.weight.device, self.params_dtype)

    def jit_kernels(self, device, dtype):
        from pymllm.layers.kernels.jit_prebuild import gemv_builds

        return cutlass_builds(device, dtype) + gemv_builds(("w8a8", "w8a8_fused"), device, dtype)

    def apply_rmsnorm(self, layer, x, residual, norm_weight, eps, bias):
        return self._behind_prologue(layer, x, bias, "rmsnorm", residual, norm_weight, eps)

    def apply_silu_mul(self, layer, x, bias):
        return self._behind_prologue(layer, x, bias, "silu_mul")

    def _behind_prologue(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor], prologue: str,
                         residual: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
                         eps: float = 1e-6):
        """``apply`` behind the RMSNorm ((y, residual)) or SiLU-and-mul (y) in front of the layer:
        the fused GEMV where it won; else the prologue quantizing its own output, one launch fewer
        than the prologue and then ``apply``; None where neither runs (the layer then does that)."""
        fused = w8a8_fused_linear(x, layer.weight.t(), layer.weight_scale, bias, prologue, residual, norm_weight, eps)
        if fused is not None:
            return fused
        rows = lambda t: t if t is None or t.dim() == 2 else t.reshape(-1, t.shape[-1])  # noqa: E731
        quantized = prologue_quant_int8(rows(x), prologue, rows(residual), norm_weight, eps)
        if quantized is None:
            return None
        q, scale, residual_out = quantized
        out = self._linear_quantized(layer, q, scale, x.dtype, bias).reshape(*x.shape[:-1], -1)
        return (out, residual_out.reshape(x.shape)) if prologue == "rmsnorm" else out

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        # Decode rows where the GEMV won: it quantizes the rows itself (no quantization launch).
        fused = w8a8_fused_linear(x2d, layer.weight.t(), layer.weight_scale, bias)
        if fused is not None:
            return fused.reshape(*x.shape[:-1], fused.shape[-1])
        q, scale = per_token_quant_int8(x2d)
        out = self._linear_quantized(layer, q, scale, x.dtype, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def _linear_quantized(layer: nn.Module, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                          bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer's output from rows already quantized per token: the int8 GEMM, or for
        decode-sized batches the weight-streaming GEMV where it measures faster."""

        def gemm(weight_nk: torch.Tensor) -> torch.Tensor:
            return int8_scaled_mm(q, weight_nk.t(), scale, layer.weight_scale, dtype, bias)

        weight_nk = layer.weight.t()  # the checkpoint's row-major [N, K]
        out = w8a8_gemv_or_none(q, scale, weight_nk, layer.weight_scale, dtype, bias, gemm)
        return gemm(weight_nk) if out is None else out
