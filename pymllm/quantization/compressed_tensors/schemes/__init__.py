"""Quantization schemes of compressed-tensors checkpoints that pymllm runs."""

from pymllm.quantization.compressed_tensors.schemes.base import CompressedTensorsScheme
from pymllm.quantization.compressed_tensors.schemes.w8a8_int8 import W8A8Int8Scheme
from pymllm.quantization.compressed_tensors.schemes.wna16 import WNA16Scheme

__all__ = ["CompressedTensorsScheme", "W8A8Int8Scheme", "WNA16Scheme"]
