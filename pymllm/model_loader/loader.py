"""Build a model from its config and fill its weights (safetensors, or random for dummy)."""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from pymllm.configs.errors import ConfigError
from pymllm.configs.model_config import ModelConfig
from pymllm.layers.kernels.jit_prebuild import start_kernel_builds
from pymllm.models import get_model_class

logger = logging.getLogger(__name__)


def safetensors_files(model_path: str) -> List[str]:
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_path, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ConfigError(f"--server.model_path: shard(s) listed in the index are missing: {missing}")
        return files
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise ConfigError(
            f"--server.model_path: no *.safetensors in {model_path} "
            "(use --server.load_format dummy for random weights)"
        )
    return files


def iterate_safetensors(files: List[str], device: str = "cpu") -> Iterator[Tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    from tqdm import tqdm

    total = 0
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            total += len(f.keys())
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=None) as bar:
        for path in files:
            with safe_open(path, framework="pt", device=device) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
                    bar.update(1)


def _init_dummy_weights(model: nn.Module, seed: int) -> None:
    # Small values keep activations finite through many layers; real shapes, random content.
    gen_device = next(model.parameters()).device
    generator = torch.Generator(device=gen_device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dtype.is_floating_point:
            if "norm" in name:
                param.data.fill_(1.0)
            else:
                param.data.uniform_(-0.02, 0.02, generator=generator)
        else:
            param.data.random_(-8, 8, generator=generator)


def load_model(
    model_config: ModelConfig,
    load_format: str,
    device: torch.device,
    seed: int = 0,
    quant_config=None,
    extra_builds: Optional[Callable[[nn.Module], list]] = None,
) -> nn.Module:
    """The model with its weights (a checkpoint, or ``dummy``), in its kernels' layout.
    ``extra_builds(model)``: more JIT build steps for the pool that compiles the model's kernels
    while the weights load (the runner's attention modules)."""
    cls = get_model_class(model_config.hf_config)
    if quant_config is not None:
        # Quantization configs name checkpoint modules (q_proj); layers are named after the fusion.
        quant_config.set_packed_modules(getattr(cls, "stacked_params_mapping", ()))
    start = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(model_config.dtype)
    try:
        with torch.device(device):
            model = cls(model_config.hf_config, quant_config=quant_config)
    finally:
        torch.set_default_dtype(previous)
    # The JIT kernels compile on a thread pool while the weights load (first start only); the
    # block's end joins them, so the post-load self-tests below find them built.
    with start_kernel_builds(model, device, model_config.dtype, extra_builds):
        if load_format == "dummy":
            _init_dummy_weights(model, seed)
        else:
            files = safetensors_files(model_config.model_path)
            loaded = model.load_weights(iterate_safetensors(files))
            expected = {n for n, _ in model.named_parameters()}
            missing = expected - loaded
            if missing:
                raise ConfigError(
                    f"--server.model_path: checkpoint lacks {len(missing)} parameter(s), e.g. {sorted(missing)[:5]}"
                )
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    model.eval()
    logger.info(
        "Loaded %s (%s, %s) on %s in %.2f s",
        model_config.architecture, load_format, str(model_config.dtype).replace("torch.", ""),
        device, time.perf_counter() - start,
    )
    return model
