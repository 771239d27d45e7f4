"""Interfaces between linear layers and quantization formats.

QuantizationConfig parses the checkpoint's quantization config and picks a LinearMethod per
layer; the LinearMethod owns the layer's parameters, their one post-load layout conversion and
the forward.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from mllm_kernel.jit_utils import BuildStep

    from pymllm.layers.deferred_norm import DeferredNorm


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

    def jit_kernels(self, layer: nn.Module, device: torch.device, dtype: torch.dtype) -> List["BuildStep"]:
        """The JIT kernel builds ``process_weights_after_loading`` and the forward will ask for
        (pymllm.layers.kernels.jit_prebuild runs them in parallel while the weights load); only
        builds, never required: a kernel missing here is built on first use."""
        return []

    @abc.abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The forward: y = x W^T (+ bias)."""

    def apply_rmsnorm(
        self, layer: nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor,
        eps: float, bias: Optional[torch.Tensor],
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(apply(RMSNorm(x [+ residual])), x [+ residual])`` in one kernel, or None where this
        method has none for these inputs (the layer then runs the norm and ``apply``)."""
        return None

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``apply(silu(x[..., :K]) * x[..., K:])`` in one kernel, or None (see apply_rmsnorm)."""
        return None

    def apply_swiglu(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``silu(g) * u`` of ``g | u = apply(x)`` (a stacked gate/up layer) in one kernel, or
        None (see apply_rmsnorm)."""
        return None

    # A deferred RMSNorm (pymllm.layers.deferred_norm): this layer produces or consumes it.
    def takes_deferred_norm(self, layer: nn.Module, like: torch.Tensor, gated: bool) -> bool:
        """Whether ``apply_normed`` would run for an input with ``like``'s rows, dtype and device."""
        return False

    def apply_add_norm(
        self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
        bias: Optional[torch.Tensor],
    ) -> Optional["DeferredNorm"]:
        """``apply(x) + residual`` handed on with its RMSNorm deferred into the next layer, in one
        kernel, or None where this method has none for these inputs."""
        return None

    def apply_normed(
        self, layer: nn.Module, pending: "DeferredNorm", bias: Optional[torch.Tensor], gated: bool
    ) -> Optional[torch.Tensor]:
        """``apply(norm(h))`` (``gated``: ``apply_swiglu(norm(h))``) from a deferred norm, or None."""
        return None

    def one_row_attention_split_cap(self, layer: nn.Module) -> Optional[int]:
        """Where this layer takes the attention's output (o_proj): a cap on the KV splits of the
        one-row decode graph's attention kernel that this method's kernel runs best behind, or
        None for the backend's own (pymllm.layers.attention.triton_decode.ROPE_MAX_SPLITS)."""
        return None


class QuantizationConfig(abc.ABC):
    def __init__(self) -> None:
        # Fused layer name -> the checkpoint modules stacked into it, in shard order,
        # e.g. "qkv_proj" -> ["q_proj", "k_proj", "v_proj"]; set from the model class.
        self.packed_modules: Dict[str, List[str]] = {}

    def set_packed_modules(self, stacked_params_mapping: Iterable[Tuple[str, str, Union[str, int]]]) -> None:
        """Learn the fusion from a model's ``stacked_params_mapping`` of (fused, checkpoint, shard id)."""
        packed: Dict[str, List[str]] = {}
        for fused, checkpoint, _ in stacked_params_mapping:
            packed.setdefault(fused, []).append(checkpoint)
        self.packed_modules = packed

    def checkpoint_names(self, prefix: str) -> List[str]:
        """The checkpoint module names behind layer ``prefix`` (several for a fused layer)."""
        parent, _, leaf = prefix.rpartition(".")
        shards = self.packed_modules.get(leaf)
        if not shards:
            return [prefix]
        return [f"{parent}.{shard}" if parent else shard for shard in shards]

    @abc.abstractmethod
    def get_linear_method(self, prefix: str) -> Optional[LinearMethodBase]:
        """The method for the linear layer named `prefix`, or None to leave it unquantized."""
