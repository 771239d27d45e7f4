"""A Scheme owns one quantization format's parameters, their layout conversion and the forward."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch
from torch import nn

if TYPE_CHECKING:
    from pymllm.layers.deferred_norm import DeferredNorm


class CompressedTensorsScheme(abc.ABC):
    @abc.abstractmethod
    def create_weights(
        self, layer: nn.Module, input_size: int, output_partition_sizes: List[int], params_dtype: torch.dtype
    ) -> None:
        """Register the checkpoint-facing parameters (the names compressed-tensors saves)."""

    @abc.abstractmethod
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """The one conversion from checkpoint layout to the kernels' layout."""

    @abc.abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Forward only: y = x W^T (+ bias) with the runtime layout; never repacks."""

    def jit_kernels(self, device: torch.device, dtype: torch.dtype) -> list:
        """The JIT builds this scheme's layers use (LinearMethodBase.jit_kernels)."""
        return []

    def apply_rmsnorm(
        self, layer: nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor,
        eps: float, bias: Optional[torch.Tensor],
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """RMSNorm fused in front of ``apply`` (see LinearMethodBase.apply_rmsnorm); None: no such kernel."""
        return None

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """SiLU-and-mul fused in front of ``apply``; None: no such kernel."""
        return None

    def apply_swiglu(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """SiLU-and-mul fused behind ``apply`` of a stacked gate/up layer; None: no such kernel."""
        return None

    def takes_deferred_norm(self, layer: nn.Module, like: torch.Tensor, gated: bool) -> bool:
        """Whether ``apply_normed`` would run (see LinearMethodBase.takes_deferred_norm)."""
        return False

    def apply_add_norm(
        self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
        bias: Optional[torch.Tensor],
    ) -> Optional["DeferredNorm"]:
        """A deferred RMSNorm's producer side (LinearMethodBase.apply_add_norm); None: no such kernel."""
        return None

    def apply_normed(
        self, layer: nn.Module, pending: "DeferredNorm", bias: Optional[torch.Tensor], gated: bool
    ) -> Optional[torch.Tensor]:
        """A deferred RMSNorm's consumer side (LinearMethodBase.apply_normed); None: no such kernel."""
        return None

    def one_row_attention_split_cap(self, layer: nn.Module) -> Optional[int]:
        """See LinearMethodBase.one_row_attention_split_cap; None: the backend's own."""
        return None


def replace_parameter(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap a parameter for its runtime form (a plain frozen Parameter: loader attributes are spent)."""
    delattr(layer, name)
    layer.register_parameter(name, nn.Parameter(value, requires_grad=False))
