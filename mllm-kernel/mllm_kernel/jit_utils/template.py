"""Python values -> C++ template arguments."""

from __future__ import annotations

from collections.abc import Sequence

import torch

_PORTABLE_TYPES = {
    torch.int8: "int8_t",
    torch.int16: "int16_t",
    torch.int32: "int32_t",
    torch.int64: "int64_t",
    torch.uint8: "uint8_t",
    torch.bool: "bool",
    torch.float32: "float",
    torch.float64: "double",
}

# CUDA has native half-precision types. C++17 on the host has none, so the
# CPU sources get the storage types declared in cpu/csrc/common.h.
_DTYPE_TO_CPP = {
    "cuda": {
        **_PORTABLE_TYPES,
        torch.float16: "__half",
        torch.bfloat16: "__nv_bfloat16",
    },
    "cpu": {
        **_PORTABLE_TYPES,
        torch.float16: "mllm_kernel::fp16_t",
        torch.bfloat16: "mllm_kernel::bf16_t",
    },
}


def to_cpp(value: object, device: str) -> str:
    """Render one template argument: a torch dtype, a bool or an int."""
    if isinstance(value, torch.dtype):
        try:
            return _DTYPE_TO_CPP[device][value]
        except KeyError:
            raise TypeError(f"dtype {value} has no C++ type for {device} kernels") from None
    # bool before int: bool is a subclass of int.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    raise TypeError(
        f"template argument {value!r} of type {type(value).__name__} is not supported; "
        "use a torch dtype, a bool or an int"
    )


def render_template_args(values: Sequence[object], device: str) -> tuple[str, ...]:
    return tuple(to_cpp(value, device) for value in values)
