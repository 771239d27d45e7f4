"""Pick and build the attention backend named by --server.attention_backend."""

from __future__ import annotations

import importlib.util
import logging

from pymllm.configs.errors import ConfigError
from pymllm.layers.attention.base_backend import AttentionBackend

logger = logging.getLogger(__name__)


def flashinfer_available() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


def choose_attention_backend(requested: str, device_type: str, flashinfer_importable: bool) -> str:
    if requested == "auto":
        if device_type == "cuda" and flashinfer_importable:
            return "flashinfer"
        return "torch_native"
    if requested == "flashinfer":
        if device_type != "cuda":
            raise ConfigError("--server.attention_backend: flashinfer needs a CUDA device")
        if not flashinfer_importable:
            raise ConfigError("--server.attention_backend: flashinfer is not installed (pip install flashinfer-python)")
    return requested


def create_attention_backend(requested: str, runner) -> AttentionBackend:
    name = choose_attention_backend(requested, runner.device.type, flashinfer_available())
    logger.info("Attention backend: %s (requested %s)", name, requested)
    if name == "flashinfer":
        from pymllm.layers.attention.flashinfer_backend import FlashInferAttnBackend

        return FlashInferAttnBackend(runner)
    from pymllm.layers.attention.torch_native_backend import TorchNativeAttnBackend

    return TorchNativeAttnBackend()
