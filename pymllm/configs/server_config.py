"""Server configuration: every field becomes a ``--server.<field>`` CLI flag."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from pymllm.configs.errors import ConfigError


def _flag(help: str, choices: Optional[tuple] = None) -> dict:
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    return meta


@dataclass
class ServerConfig:
    # --- model ---
    model_path: Optional[str] = field(
        default=None,
        metadata=_flag("Model directory (HF format). Empty: the embedded SmolLM2-135M-Instruct."),
    )
    tokenizer_path: Optional[str] = field(
        default=None, metadata=_flag("Tokenizer directory; defaults to model_path.")
    )
    load_format: str = field(
        default="auto",
        metadata=_flag(
            "How to load weights; dummy makes random weights from config.json; gguf converts a "
            ".gguf file (model_path) once into ~/.cache/pymllm.",
            ("auto", "safetensors", "dummy", "gguf"),
        ),
    )
    dtype: str = field(
        default="auto",
        metadata=_flag(
            "Compute dtype. auto: bf16 on GPUs that support it, float32 on CPU.",
            ("auto", "float16", "bfloat16", "float32"),
        ),
    )
    device: str = field(
        default="auto", metadata=_flag("Where the model runs.", ("auto", "cuda", "cpu"))
    )
    served_model_name: Optional[str] = field(
        default=None, metadata=_flag("Model name reported by /v1/models; default: the model directory name.")
    )
    context_length: Optional[int] = field(
        default=None, metadata=_flag("Maximum tokens per sequence; defaults to the model's.")
    )
    # --- memory and batching ---
    max_running_requests: int = field(
        default=64, metadata=_flag("Most requests decoding at once.")
    )
    max_total_tokens: Optional[int] = field(
        default=None,
        metadata=_flag("KV cache capacity in tokens; default: from mem_fraction_static on a GPU, 32768 on CPU."),
    )
    max_prefill_tokens: int = field(
        default=8192, metadata=_flag("Token budget of one prefill step; longer prompts are chunked.")
    )
    mem_fraction_static: float = field(
        default=0.85,
        metadata=_flag("Fraction of free GPU memory for weights plus KV cache."),
    )
    max_queued_requests: Optional[int] = field(
        default=None, metadata=_flag("Waiting-queue bound; requests past it get 503.")
    )
    disable_radix_cache: bool = field(
        default=False, metadata=_flag("Use ChunkCache (no prefix reuse) instead of the radix cache.")
    )
    attention_backend: str = field(
        default="auto",
        metadata=_flag(
            "Attention kernels. auto: flashinfer on CUDA when importable, else torch_native.",
            ("auto", "torch_native", "flashinfer"),
        ),
    )
    disable_cuda_graph: bool = field(
        default=False,
        metadata=_flag("Run decode and prefill eagerly instead of replaying captured CUDA graphs (for debugging)."),
    )
    disable_pdl: bool = field(
        default=False,
        metadata=_flag(
            "Launch the decode kernels plainly instead of as programmatic dependents of the kernel "
            "before them (SM90+ only; for debugging and A/B timing)."
        ),
    )
    disable_overlap_schedule: bool = field(
        default=False,
        metadata=_flag(
            "Read each decode step's tokens before launching the next step, instead of launching "
            "the next step first so that the host's work between steps overlaps the GPU."
        ),
    )
    enable_mixed_batches: bool = field(
        default=False,
        metadata=_flag(
            "Decode the running requests' next token in the same batch as a prompt being prefilled, "
            "instead of pausing them for that step."
        ),
    )
    cuda_graph_max_bs: Optional[int] = field(
        default=None,
        metadata=_flag("Largest decode batch captured as a CUDA graph; default: max_running_requests."),
    )
    prefill_cuda_graph_max_tokens: int = field(
        default=1024,
        metadata=_flag(
            "Prefills of up to this many tokens replay piecewise CUDA graphs (everything but the "
            "attention) instead of launching every layer from Python; 0: prefill eagerly."
        ),
    )
    # --- runtime ---
    random_seed: int = field(default=0, metadata=_flag("Seed for weights of dummy models and unseeded sampling."))
    log_level: str = field(
        default="info",
        metadata=_flag("Logging level.", ("debug", "info", "warning", "error")),
    )
    gc_warn_ms: float = field(
        default=50.0,
        metadata=_flag(
            "Log a warning when one garbage collection pauses a server process longer than this "
            "many milliseconds (such a pause stalls every stream that process serves); 0: off."
        ),
    )
    # --- HTTP ---
    host: str = field(default="127.0.0.1", metadata=_flag("HTTP bind address."))
    port: int = field(default=30000, metadata=_flag("HTTP port."))
    api_key: Optional[str] = field(
        default=None, metadata=_flag("Require 'Authorization: Bearer <key>' on API routes.")
    )
    # --- media (image inputs of multimodal models) ---
    allowed_local_media_path: Optional[str] = field(
        default=None,
        metadata=_flag(
            "Directory that local image paths (absolute paths, file://) must resolve inside; "
            "unset: any file the server can read."
        ),
    )
    allow_private_media_urls: bool = field(
        default=False,
        metadata=_flag("Let image URLs fetch from private, loopback and link-local addresses."),
    )
    reasoning_parser: Optional[str] = field(
        default=None,
        metadata=_flag("Split <think> reasoning into reasoning_content.", ("qwen3",)),
    )

    def validate(self) -> None:
        """Check values whose domain the type alone does not express."""
        for name, meta_choices in _choices_of(self).items():
            value = getattr(self, name)
            if value is not None and value not in meta_choices:
                raise ConfigError(
                    f"--server.{name}: {value!r} is not one of {', '.join(map(str, meta_choices))}"
                )
        _positive(self, "max_running_requests")
        _positive(self, "max_prefill_tokens")
        _positive(self, "max_total_tokens", optional=True)
        _positive(self, "context_length", optional=True)
        _positive(self, "max_queued_requests", optional=True, allow_zero=True)
        _positive(self, "cuda_graph_max_bs", optional=True)
        _positive(self, "prefill_cuda_graph_max_tokens", allow_zero=True)
        if not 0.0 < self.mem_fraction_static <= 1.0:
            raise ConfigError(
                f"--server.mem_fraction_static: {self.mem_fraction_static} must be in (0, 1]"
            )
        if self.allowed_local_media_path is not None and not os.path.isdir(self.allowed_local_media_path):
            raise ConfigError(
                f"--server.allowed_local_media_path: {self.allowed_local_media_path} is not a directory"
            )
        if self.gc_warn_ms < 0:
            raise ConfigError(f"--server.gc_warn_ms: {self.gc_warn_ms} must be >= 0 (0 turns the warning off)")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--server.port: {self.port} is not a valid TCP port")

    @property
    def effective_tokenizer_path(self) -> Optional[str]:
        return self.tokenizer_path or self.model_path


def _choices_of(cfg) -> dict:
    from dataclasses import fields

    return {f.name: f.metadata["choices"] for f in fields(cfg) if "choices" in f.metadata}


def _positive(cfg, name: str, optional: bool = False, allow_zero: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and optional:
        return
    if value is None or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"--server.{name}: {value} must be {bound}")
