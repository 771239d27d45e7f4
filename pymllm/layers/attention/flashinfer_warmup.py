"""FlashInfer's JIT attention modules, compiled while the weights load.

FlashInfer 0.6 compiles each attention module (by dtypes, head dim, backend) the first time a
wrapper is planned with it; on a machine without its cache that took ~80 s of a Qwen3-8B first
start on an H200 host, in the runner's warm-up, after the weights and mllm_kernel's builds. This
step plans a throwaway ``FlashInferAttnBackend`` on a tiny pool of its own for the batch kinds a
server plans (the runner's warm-up: a prefill and an extend on a cached prefix; and an eager
decode step, which batches beyond the captured graphs take), so the same modules compile
on the loader's build pool (pymllm.layers.kernels.jit_prebuild) next to the other JIT builds; the
real backend then finds them in FlashInfer's caches. Planning the same backend class through
``init_forward_metadata`` keeps the module choices identical to the runner's by construction.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, List

import torch
from torch import nn

from pymllm.engine.forward_batch import ForwardBatch, ForwardMode
from pymllm.mem_cache.memory_pool import KVPool, ReqToTokenPool

if TYPE_CHECKING:
    from mllm_kernel.jit_utils import BuildStep

# (prefix, new tokens) of the extend batches the runner's warm-up runs; then one eager decode row.
_EXTENDS = ((0, 8), (8, 4))
_POOL_TOKENS = 64


def _extend_batch(prefix: int, new: int, device: torch.device) -> ForwardBatch:
    total = prefix + new
    return ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=1,
        input_ids=torch.zeros(new, dtype=torch.int64, device=device),
        positions=torch.arange(prefix, total, device=device),
        req_pool_indices=torch.zeros(1, dtype=torch.int64, device=device),
        seq_lens=torch.tensor([total], dtype=torch.int32, device=device),
        out_cache_loc=torch.arange(prefix + 1, total + 1, device=device),
        seq_lens_cpu=[total], extend_seq_lens_cpu=[new], extend_prefix_lens_cpu=[prefix],
        extend_seq_lens=torch.tensor([new], dtype=torch.int32, device=device),
        extend_prefix_lens=torch.tensor([prefix], dtype=torch.int32, device=device),
    )


def _decode_batch(seq_len: int, device: torch.device) -> ForwardBatch:
    return ForwardBatch(
        forward_mode=ForwardMode.DECODE, batch_size=1,
        input_ids=torch.zeros(1, dtype=torch.int64, device=device),
        positions=torch.tensor([seq_len - 1], device=device),
        req_pool_indices=torch.zeros(1, dtype=torch.int64, device=device),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32, device=device),
        out_cache_loc=torch.tensor([seq_len], device=device),
        seq_lens_cpu=[seq_len],
    )


def plan_like_the_warmup(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Build a FlashInferAttnBackend for ``model`` on a tiny pool and plan the runner's warm-up
    batches and an eager decode step; FlashInfer compiles (or loads) the modules they need."""
    from pymllm.layers.attention.flashinfer_backend import AttentionGeometry, FlashInferAttnBackend, attention_layers

    geometry = AttentionGeometry.from_layers(attention_layers(model))
    with torch.cuda.device(device):  # a build-pool thread starts on the default device
        req_to_token = ReqToTokenPool(2, _POOL_TOKENS, device)
        req_to_token.req_to_token[0] = torch.arange(1, _POOL_TOKENS + 1, dtype=req_to_token.req_to_token.dtype)
        runner = SimpleNamespace(
            device=device, dtype=dtype, model=model, req_to_token_pool=req_to_token,
            kv_pool=KVPool(_POOL_TOKENS, 1, geometry.num_kv_heads, geometry.head_dim, dtype, device),
        )
        backend = FlashInferAttnBackend(runner)
        for prefix, new in _EXTENDS:
            backend.init_forward_metadata(_extend_batch(prefix, new, device))
        backend.init_forward_metadata(_decode_batch(sum(_EXTENDS[-1]), device))
        torch.cuda.synchronize(device)
        del backend, runner, req_to_token
        # Hand the workspace back to the device: the KV cache is sized from the free memory.
        torch.cuda.empty_cache()


def flashinfer_builds(model: nn.Module, device: torch.device, dtype: torch.dtype) -> List["BuildStep"]:
    """The warm-up planning as a build step, where the runner will pick FlashInfer."""
    from mllm_kernel.jit_utils import BuildStep

    return [BuildStep("flashinfer attention modules", lambda: plan_like_the_warmup(model, device, dtype))]
