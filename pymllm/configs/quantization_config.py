"""Quantization configuration: every field becomes a ``--quantization.<field>`` CLI flag."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pymllm.configs.errors import ConfigError

# The formats pymllm.quantization implements (kept literal here: importing that package from
# the config layer would pull in the kernels); a test keeps the two in sync.
QUANTIZATION_METHODS = ("compressed-tensors",)


@dataclass
class QuantizationConfig:
    method: Optional[str] = field(
        default=None,
        metadata={
            "help": "Quantized checkpoint format (W8A8 int8, W4A16). Unset: detected from the "
            "quantization_config of config.json; unquantized checkpoints need nothing.",
            "choices": QUANTIZATION_METHODS,
        },
    )

    def validate(self) -> None:
        if self.method is not None and self.method not in QUANTIZATION_METHODS:
            raise ConfigError(
                f"--quantization.method: {self.method!r} is not one of {', '.join(QUANTIZATION_METHODS)}"
            )
