"""Model registry keyed by the `architectures` entry of config.json."""

from __future__ import annotations

from typing import Dict, Type

from torch import nn

from pymllm.models.llama import LlamaForCausalLM
from pymllm.models.qwen2 import Qwen2ForCausalLM
from pymllm.models.qwen3 import Qwen3ForCausalLM
from pymllm.models.qwen3_vl import Qwen3VLForConditionalGeneration

MODEL_REGISTRY: Dict[str, Type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3VLForConditionalGeneration": Qwen3VLForConditionalGeneration,
}


def get_model_class(hf_config) -> Type[nn.Module]:
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported model architecture {architectures or '(none in config.json)'}; "
        f"supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )
