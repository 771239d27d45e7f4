"""ModelConfig: what the engine needs to know about a checkpoint, resolved once at start."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from pymllm.configs.errors import ConfigError
from pymllm.configs.server_config import ServerConfig

logger = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class ModelConfig:
    model_path: str
    tokenizer_path: str
    hf_config: Any
    dtype: torch.dtype
    context_length: int
    generation_defaults: Dict[str, Any] = field(default_factory=dict)
    eos_token_ids: List[int] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or ["?"]
        return archs[0]

    @property
    def text_config(self) -> Any:
        """The language model's config (multimodal configs nest it under text_config)."""
        return getattr(self.hf_config, "text_config", None) or self.hf_config

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        cfg = self.text_config
        return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads

    @property
    def head_dim(self) -> int:
        cfg = self.text_config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size


def resolve_model_path(server: ServerConfig) -> str:
    """The model directory; with none given, the embedded SmolLM2 (converted once from GGUF)."""
    if server.model_path and _is_gguf_source(Path(server.model_path).expanduser(), server.load_format):
        return str(_converted_gguf(Path(server.model_path).expanduser()))
    if server.model_path:
        path = Path(server.model_path).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--server.model_path: {server.model_path} is not a directory")
        if not (path / "config.json").is_file():
            raise ConfigError(f"--server.model_path: {server.model_path} has no config.json")
        return str(path)
    from pymllm.model_loader.gguf_loader import ensure_embedded_model

    return str(ensure_embedded_model())


def _is_gguf_source(path: Path, load_format: str) -> bool:
    # A directory already converted (config.json, no .gguf) loads like any HF directory, so
    # worker processes can resolve the path the frontend converted again cheaply.
    if path.suffix == ".gguf":
        return True
    return load_format == "gguf" and path.is_dir() and any(path.glob("*.gguf"))


def _converted_gguf(path: Path) -> Path:
    """A .gguf file, or a directory holding exactly one, converted once into an HF directory."""
    from pymllm.model_loader.gguf_loader import ensure_converted

    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise ConfigError(f"--server.model_path: expected one .gguf file in {path}, found {len(found)}")
        path = found[0]
    if not path.is_file():
        raise ConfigError(f"--server.model_path: {path} is not a GGUF file")
    return ensure_converted(path)


def resolve_dtype(name: str, hf_config: Any, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


def _as_list(value) -> List[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def load_model_config(server: ServerConfig, device: torch.device, model_path: Optional[str] = None) -> ModelConfig:
    from transformers import AutoConfig

    model_path = model_path or resolve_model_path(server)
    try:
        hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    except Exception as e:  # transformers raises several types for unreadable configs
        raise ConfigError(f"--server.model_path: cannot read config.json in {model_path}: {e}") from e
    text_config = getattr(hf_config, "text_config", None) or hf_config
    generation = _read_json(Path(model_path) / "generation_config.json")
    max_pos = getattr(text_config, "max_position_embeddings", None) or 4096
    context_length = server.context_length or max_pos
    if server.context_length and server.context_length > max_pos:
        logger.warning(
            "--server.context_length %d exceeds the model's max_position_embeddings %d",
            server.context_length, max_pos,
        )
    eos = _as_list(getattr(text_config, "eos_token_id", None)) + _as_list(generation.get("eos_token_id"))
    tokenizer_path = server.tokenizer_path or model_path
    if not os.path.isdir(tokenizer_path):
        raise ConfigError(f"--server.tokenizer_path: {tokenizer_path} is not a directory")
    return ModelConfig(
        model_path=model_path,
        tokenizer_path=tokenizer_path,
        hf_config=hf_config,
        dtype=resolve_dtype(server.dtype, hf_config, device),
        context_length=int(context_length),
        generation_defaults=generation,
        eos_token_ids=sorted(set(eos)),
    )
