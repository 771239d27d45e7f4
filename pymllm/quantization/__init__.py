"""Quantized checkpoints: pick the QuantizationConfig for a model from the CLI and config.json.

``--quantization.method compressed-tensors`` asks for it explicitly; without the flag, a
checkpoint whose ``quantization_config.quant_method`` names a supported method is detected.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from pymllm.configs.errors import ConfigError
from pymllm.quantization.base import QuantizationConfig
from pymllm.quantization.compressed_tensors import CompressedTensorsConfig

QUANTIZATION_METHODS = {CompressedTensorsConfig.name: CompressedTensorsConfig}


def _checkpoint_quant_config(hf_config: Any) -> Optional[Dict[str, Any]]:
    text_config = getattr(hf_config, "text_config", None)
    raw = getattr(hf_config, "quantization_config", None) or getattr(text_config, "quantization_config", None)
    if raw is None:
        return None
    return raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)


def get_quantization_config(method: Optional[str], hf_config: Any) -> Optional[QuantizationConfig]:
    """The parsed config, or None for an unquantized model; ConfigError names the flag at fault."""
    raw = _checkpoint_quant_config(hf_config)
    found = None if raw is None else raw.get("quant_method")
    if method is None:
        if raw is None:
            return None
        if found not in QUANTIZATION_METHODS:
            raise ConfigError(
                f"--quantization.method: the checkpoint is quantized with {found!r}, which is not supported "
                f"(supported: {', '.join(QUANTIZATION_METHODS)})"
            )
        method = found
    if method not in QUANTIZATION_METHODS:
        raise ConfigError(f"--quantization.method: {method!r} is not one of {', '.join(QUANTIZATION_METHODS)}")
    if raw is None:
        raise ConfigError(f"--quantization.method {method}: config.json has no quantization_config")
    if found is not None and found != method:
        raise ConfigError(f"--quantization.method {method}: the checkpoint is quantized with {found!r}")
    try:
        return QUANTIZATION_METHODS[method].from_config(raw)
    except ValueError as error:
        raise ConfigError(f"--quantization.method {method}: {error}") from None
