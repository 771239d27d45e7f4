"""compressed-tensors checkpoints: W8A8 int8 and W4A16 (pack-quantized)."""

from pymllm.quantization.compressed_tensors.config import CompressedTensorsConfig

__all__ = ["CompressedTensorsConfig"]
