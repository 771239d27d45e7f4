"""Linear layers whose weights are owned by a LinearMethod (unquantized or a quant scheme).

`QKVLinear` and `MergedLinear` stack several checkpoint projections into one matrix; their
weight loaders place each checkpoint shard at its offset along the output dimension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from pymllm.layers.deferred_norm import DeferredNorm, deferred_norm_enabled
from pymllm.layers.kernels.fused_gemv import (
    dense_rmsnorm_linear, dense_silu_mul_linear, dense_swiglu_linear, prepare_fused_gemvs,
)
from pymllm.layers.kernels.gemv_dispatch import dense_linear, prepare_gemv
from pymllm.layers.utils import set_weight_attrs
from pymllm.layers.fused_ops import silu_and_mul
from pymllm.quantization.base import LinearMethodBase, QuantizationConfig

if TYPE_CHECKING:
    from pymllm.layers.layernorm import RMSNorm


class UnquantizedLinearMethod(LinearMethodBase):
    def create_weights(self, layer, input_size, output_partition_sizes, params_dtype):
        weight = nn.Parameter(
            torch.empty(sum(output_partition_sizes), input_size, dtype=params_dtype),
            requires_grad=False,
        )
        set_weight_attrs(weight, {"output_dim": 0, "input_dim": 1, "weight_loader": layer.weight_loader})
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        # Builds the decode GEMV while the model loads, not inside the first request.
        if prepare_gemv("dense", layer.weight.device, layer.weight.dtype):
            prepare_fused_gemvs("dense", layer.weight.device, layer.weight.dtype)

    def jit_kernels(self, layer, device, dtype):
        from pymllm.layers.kernels.jit_prebuild import gemv_builds

        return gemv_builds(("dense", "dense_fused"), device, dtype)

    def apply(self, layer, x, bias):
        return dense_linear(x, layer.weight, bias)

    def apply_rmsnorm(self, layer, x, residual, norm_weight, eps, bias):
        return dense_rmsnorm_linear(x, residual, norm_weight, eps, layer.weight, bias)

    def apply_silu_mul(self, layer, x, bias):
        return dense_silu_mul_linear(x, layer.weight, bias)

    def apply_swiglu(self, layer, x, bias):
        return dense_swiglu_linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    def __init__(
        self,
        input_size: int,
        output_sizes: List[int],
        shard_ids: List[Union[str, int]],
        bias: bool = False,
        quant_config: Optional[QuantizationConfig] = None,
        prefix: str = "",
        params_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(output_sizes)
        self.prefix = prefix
        params_dtype = params_dtype or torch.get_default_dtype()
        self.shard_offsets: Dict[Union[str, int], tuple[int, int]] = {}
        offset = 0
        for shard_id, size in zip(shard_ids, output_sizes):
            self.shard_offsets[shard_id] = (offset, size)
            offset += size
        method = quant_config.get_linear_method(prefix) if quant_config is not None else None
        self.quant_method: LinearMethodBase = method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, input_size, self.output_sizes, params_dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size, dtype=params_dtype), requires_grad=False)
            set_weight_attrs(self.bias, {"output_dim": 0, "weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Optional[Union[str, int]] = None
    ) -> None:
        """Copy a checkpoint tensor into `param`, at the shard's rows when the layer is stacked."""
        output_dim = getattr(param, "output_dim", None)
        target = param.data
        if shard_id is not None and output_dim is not None:
            offset, size = self.shard_offsets[shard_id]
            # Packed formats store several output rows per element along output_dim.
            pack = getattr(param, "output_pack_factor", 1)
            target = target.narrow(output_dim, offset // pack, size // pack)
        elif shard_id is not None and param.numel() > 0 and loaded_weight.dim() > 0:
            raise ValueError(f"{self.prefix}: cannot place shard {shard_id!r} of a parameter without output_dim")
        if target.shape != loaded_weight.shape:
            raise ValueError(
                f"{self.prefix}: shape mismatch for shard {shard_id!r}: "
                f"parameter {tuple(target.shape)} vs checkpoint {tuple(loaded_weight.shape)}"
            )
        target.copy_(loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def forward_rmsnorm(
        self, x: Union[torch.Tensor, DeferredNorm], residual: Optional[torch.Tensor], norm: "RMSNorm"
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(self(norm(x [+ residual])), x [+ residual])``: the pre-norm block's entry, as one
        kernel where the layer's method has one (decode GEMVs), else the norm, then the layer.
        ``x`` may be a DeferredNorm from the projection before (its residual is already added)."""
        if isinstance(x, DeferredNorm):
            return self.forward_normed(x, norm), x.residual
        fused = self.fused_rmsnorm(x, residual, norm)
        if fused is not None:
            return fused
        hidden, residual = norm_with_residual(x, residual, norm)
        return self(hidden), residual

    def fused_rmsnorm(
        self, x: torch.Tensor, residual: Optional[torch.Tensor], norm: "RMSNorm"
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """forward_rmsnorm's result when one kernel computes it here, else None."""
        return self.quant_method.apply_rmsnorm(self, x, residual, norm.weight, norm.variance_epsilon, self.bias)

    def forward_normed(self, pending: DeferredNorm, norm: "RMSNorm") -> torch.Tensor:
        """``self(norm(h))`` of a deferred norm: one kernel where the method consumes it, else the
        norm materialized first."""
        out = self.quant_method.apply_normed(self, pending, self.bias, gated=False)
        return out if out is not None else self(pending.materialize(norm))

    def takes_deferred_norm(self, like: torch.Tensor, gated: bool = False) -> bool:
        """Whether this layer would consume a deferred norm of an input like ``like`` (``gated``: in
        its SiLU-and-mul form): the switch is on and its method has the kernel."""
        return deferred_norm_enabled() and self.quant_method.takes_deferred_norm(self, like, gated)

    def forward_add_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm: "RMSNorm", consumer: "LinearBase", gated: bool = False
    ) -> Tuple[Union[torch.Tensor, DeferredNorm], torch.Tensor]:
        """``(self(x), residual)``, the end of a pre-norm block whose sum ``self(x) + residual`` feeds
        ``norm`` and then ``consumer`` (``gated``: its SiLU-and-mul form) — or, where both layers'
        kernels can (one-row decode GEMVs), ``(DeferredNorm, h)``: the add done here and the norm left
        to ``consumer`` (pymllm.layers.deferred_norm)."""
        if consumer.takes_deferred_norm(x, gated):
            pending = self.quant_method.apply_add_norm(self, x, residual, norm.weight, norm.variance_epsilon,
                                                       self.bias)
            if pending is not None:
                return pending, pending.residual
        return self(x), residual

    def forward_silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``self(silu(x[..., :K]) * x[..., K:])``, as one kernel where the layer's method has one."""
        fused = self.quant_method.apply_silu_mul(self, x, self.bias)
        return fused if fused is not None else self(silu_and_mul(x))


def norm_with_residual(
    x: torch.Tensor, residual: Optional[torch.Tensor], norm: "RMSNorm"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x [+ residual]), x [+ residual])``: a pre-norm block's normalised input and residual."""
    if residual is None:
        return norm(x), x
    return norm(x, residual)


class Linear(LinearBase):
    def __init__(self, input_size: int, output_size: int, **kwargs):
        super().__init__(input_size, [output_size], [None], **kwargs)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        super().weight_loader(param, loaded_weight, None)


class MergedLinear(LinearBase):
    """Several projections of the same input stacked on the output dim (gate_up_proj)."""

    def __init__(self, input_size: int, output_sizes: List[int], **kwargs):
        super().__init__(input_size, output_sizes, list(range(len(output_sizes))), **kwargs)

    def forward_swiglu(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``silu(gate) * up`` of this [gate; up] layer's output as one kernel (the GEMV with
        the SiLU-and-mul as its epilogue) where the layer's method has one here, else None."""
        if not self.is_gate_up():
            return None
        return self.quant_method.apply_swiglu(self, x, self.bias)

    def forward_swiglu_normed(self, pending: DeferredNorm) -> Optional[torch.Tensor]:
        """``forward_swiglu(norm(h))`` of a deferred norm in one kernel, or None (the caller then
        materializes the norm)."""
        if not self.is_gate_up():
            return None
        return self.quant_method.apply_normed(self, pending, self.bias, gated=True)

    def is_gate_up(self) -> bool:
        return len(self.output_sizes) == 2 and self.output_sizes[0] == self.output_sizes[1]


class QKVLinear(LinearBase):
    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, **kwargs
    ):
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(
            hidden_size, [self.q_size, self.kv_size, self.kv_size], ["q", "k", "v"], **kwargs
        )
