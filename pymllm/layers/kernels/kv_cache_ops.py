"""KV-cache index math and K/V stores for the paged attention backends (page size 1).

``kv_indptr`` / ``kv_indices`` are FlashInfer's CSR view of the page table: sequence i owns
``kv_indices[kv_indptr[i]:kv_indptr[i+1]]``, the KV slots of its tokens in order. The pure
functions here build them with PyTorch; ``KVCacheOps`` runs mllm_kernel's JIT kernels
(``create_kv_indices``, ``store_cache``) instead when they compile and agree with the PyTorch
versions on this device, checked once at start-up.

Nothing here synchronises with the host: lengths come in as host lists and every device
tensor is sized from them.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)


def indptr_from_lens(lens: Sequence[int]) -> torch.Tensor:
    """Exclusive prefix sum as a host int32 tensor [len(lens) + 1] (FlashInfer's indptr)."""
    out = np.zeros(len(lens) + 1, dtype=np.int64)
    out[1:] = np.cumsum(np.asarray(lens, dtype=np.int64))
    return torch.from_numpy(out.astype(np.int32))


def gather_kv_indices(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_indptr: torch.Tensor,
    total: int,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``kv_indices[kv_indptr[i] + j] = req_to_token[req_pool_indices[i], j]`` for j < seq_lens[i].

    ``total`` = sum(seq_lens), known on the host, so the gather needs no device-to-host copy.
    Writes into ``out[:total]`` when given; returns the int32 indices.
    """
    lens = seq_lens.to(torch.int64)
    rows = torch.repeat_interleave(req_pool_indices.to(torch.int64), lens, output_size=total)
    starts = torch.repeat_interleave(kv_indptr[:-1].to(torch.int64), lens, output_size=total)
    cols = torch.arange(total, device=req_to_token.device) - starts
    values = req_to_token[rows, cols]
    if out is None:
        return values.to(torch.int32)
    out[:total] = values
    return out[:total]


class KVCacheOps:
    """K/V store and kv_indices builder: mllm_kernel where it works here, else PyTorch."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self._store_cache = None
        self._create_kv_indices = None
        if device.type == "cuda":
            self._probe(dtype)

    @property
    def uses_mllm_kernel(self) -> bool:
        return self._store_cache is not None

    def _probe(self, dtype: torch.dtype) -> None:
        """Compile the kernels for this dtype once and compare them with the fallbacks."""
        try:
            from mllm_kernel.cuda.jit import create_kv_indices, store_cache
        except ImportError as e:
            logger.info("mllm_kernel not importable (%s): KV stores and indices use PyTorch", e)
            return
        try:
            gen = torch.Generator(device="cpu").manual_seed(0)
            k = torch.randn(3, 2, 16, generator=gen).to(self.device, dtype)
            v = torch.randn(3, 2, 16, generator=gen).to(self.device, dtype)
            k_cache = torch.zeros(8, 2, 16, dtype=dtype, device=self.device)
            v_cache = torch.zeros_like(k_cache)
            loc = torch.tensor([5, 1, 7], dtype=torch.int64, device=self.device)
            store_cache(k, v, k_cache, v_cache, loc)
            stores_ok = torch.equal(k_cache[loc], k) and torch.equal(v_cache[loc], v)
            req_to_token = torch.arange(40, dtype=torch.int32, device=self.device).view(4, 10)
            req_idx = torch.tensor([2, 0], dtype=torch.int64, device=self.device)
            lens = [3, 5]
            seq_lens = torch.tensor(lens, dtype=torch.int32, device=self.device)
            indptr = indptr_from_lens(lens).to(self.device)
            out = torch.empty(8, dtype=torch.int32, device=self.device)
            create_kv_indices(req_to_token, req_idx, seq_lens, indptr, None, out)
            expected = gather_kv_indices(req_to_token, req_idx, seq_lens, indptr, 8)
            indices_ok = torch.equal(out, expected)
        except Exception as e:  # a JIT compile failure must not stop the server: fall back
            logger.warning("mllm_kernel KV kernels unusable on %s (%s): using PyTorch", self.device, e)
            return
        if not (stores_ok and indices_ok):
            logger.warning("mllm_kernel KV kernels disagree with PyTorch on %s: using PyTorch", self.device)
            return
        self._store_cache, self._create_kv_indices = store_cache, create_kv_indices
        logger.info("KV stores and kv_indices: mllm_kernel JIT kernels")

    def try_store(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor
    ) -> bool:
        """k, v: [T, H, D]; k_cache[loc[i]] = k[i], v_cache[loc[i]] = v[i] with mllm_kernel.

        Returns False (nothing written) when the kernel cannot take these operands; the caller
        then stores through KVPool.set_kv.
        """
        if not (
            self._store_cache is not None
            and k.dtype == k_cache.dtype
            and v.dtype == v_cache.dtype
            and loc.dtype == torch.int64
            and loc.is_contiguous()
            and k.stride(-1) == 1
            and v.stride(-1) == 1
            and k.stride(-2) == k.shape[-1]
            and v.stride(-2) == v.shape[-1]
        ):
            return False
        self._store_cache(k, v, k_cache, v_cache, loc)
        return True

    @property
    def kv_indices_capturable(self) -> bool:
        """Whether kv_indices can be captured in a CUDA graph: mllm_kernel's gather sizes itself
        from kv_indptr on the device; the PyTorch fallback needs the total on the host."""
        return self._create_kv_indices is not None

    def kv_indices(
        self,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        kv_indptr: torch.Tensor,
        total: int,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Device kv_indices [total] int32 (a prefix of ``out`` when given)."""
        if self._create_kv_indices is not None and seq_lens.dtype == torch.int32:
            if out is None:
                out = torch.empty(total, dtype=torch.int32, device=kv_indptr.device)
            self._create_kv_indices(req_to_token, req_pool_indices, seq_lens, kv_indptr, None, out)
            return out[:total]
        return gather_kv_indices(req_to_token, req_pool_indices, seq_lens, kv_indptr, total, out)
