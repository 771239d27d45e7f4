"""Argument validation shared by the kernel wrappers, with messages that name
the operation and the offending argument."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

SUPPORTED_DEVICES = ("cpu", "cuda")


def check_tensor(
    op: str,
    name: str,
    value: object,
    *,
    ndim: int,
    dtypes: Collection[torch.dtype],
    shape_hint: str,
) -> torch.Tensor:
    """``value`` is a tensor of rank ``ndim`` whose dtype is one of ``dtypes``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {shape_hint}, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {allowed}, got {str(value.dtype).removeprefix('torch.')}")
    return value


def check_size(op: str, name: str, tensor: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if tensor.shape[dim] != expected:
        raise ValueError(f"{op}: {name}.shape[{dim}] must be {what} ({expected}), got {tensor.shape[dim]}")


def check_same_dtype(op: str, tensors: Mapping[str, torch.Tensor]) -> None:
    (first_name, first), *rest = tensors.items()
    for name, tensor in rest:
        if tensor.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {tensor.dtype} but {first_name} has {first.dtype}")


def check_same_device(op: str, tensors: Mapping[str, torch.Tensor]) -> None:
    (first_name, first), *rest = tensors.items()
    if first.device.type not in SUPPORTED_DEVICES:
        raise ValueError(f"{op}: tensors must be on cpu or cuda, {first_name} is on {first.device}")
    for name, tensor in rest:
        if tensor.device != first.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but {first_name} is on {first.device}")


def check_contiguous(op: str, name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def check_dense_inner_dims(op: str, name: str, tensor: torch.Tensor, count: int) -> None:
    """The last ``count`` dims are laid out densely; the leading stride is free,
    so views such as a split of a fused QKV projection are accepted."""
    shape, strides = tensor.shape, tensor.stride()
    expected = 1
    for dim in range(len(shape) - 1, len(shape) - 1 - count, -1):
        if shape[dim] > 1 and strides[dim] != expected:
            raise ValueError(f"{op}: {name} must be dense in its last {count} dims, got strides {strides}")
        expected *= shape[dim]
