"""Pick and build the attention backend named by --server.attention_backend."""

from __future__ import annotations

import importlib.util
import logging
from typing import Callable, Optional

import torch
from torch import nn

from pymllm.configs.errors import ConfigError
from pymllm.layers.attention.base_backend import AttentionBackend

logger = logging.getLogger(__name__)


def flashinfer_available() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


_FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)


def choose_attention_backend(
    requested: str, device_type: str, flashinfer_importable: bool, dtype: Optional[torch.dtype] = None
) -> str:
    dtype_ok = dtype is None or dtype in _FLASHINFER_DTYPES
    if requested == "auto":
        if device_type == "cuda" and flashinfer_importable and dtype_ok:
            return "flashinfer"
        return "torch_native"
    if requested == "flashinfer":
        if device_type != "cuda":
            raise ConfigError("--server.attention_backend: flashinfer needs a CUDA device")
        if not flashinfer_importable:
            raise ConfigError("--server.attention_backend: flashinfer is not installed (pip install flashinfer-python)")
        if not dtype_ok:
            raise ConfigError(
                f"--server.attention_backend: flashinfer needs --server.dtype float16 or bfloat16, not {dtype}"
            )
    return requested


def attention_jit_builds(requested: str, runner) -> Optional[Callable[[nn.Module], list]]:
    """The JIT builds of the backend ``create_attention_backend`` will pick, as a function of the
    model for the loader's build pool (FlashInfer's attention modules); None for the others."""
    if choose_attention_backend(requested, runner.device.type, flashinfer_available(), runner.dtype) != "flashinfer":
        return None
    from pymllm.layers.attention.flashinfer_warmup import flashinfer_builds

    return lambda model: flashinfer_builds(model, runner.device, runner.dtype)


def create_attention_backend(requested: str, runner) -> AttentionBackend:
    name = choose_attention_backend(requested, runner.device.type, flashinfer_available(), runner.dtype)
    logger.info("Attention backend: %s (requested %s)", name, requested)
    if name == "flashinfer":
        from pymllm.layers.attention.flashinfer_backend import FlashInferAttnBackend

        return FlashInferAttnBackend(runner)
    from pymllm.layers.attention.torch_native_backend import TorchNativeAttnBackend

    return TorchNativeAttnBackend()
