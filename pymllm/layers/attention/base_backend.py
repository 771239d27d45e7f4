"""The attention backend interface.

A backend owns attention metadata (built once per forward in ``init_forward_metadata``) and the
attention math. It writes the new tokens' K/V into the KV pool at ``out_cache_loc`` (unless the
layer passes ``save_kv_cache=False`` because a fused kernel already wrote them there) and attends
over each sequence's slots listed in ``req_to_token``. It never allocates or frees KV slots.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Callable, Optional

import torch

if TYPE_CHECKING:
    from pymllm.engine.forward_batch import ForwardBatch
    from pymllm.layers.radix_attention import RadixAttention


class AttentionBackend(abc.ABC):
    name: str = "base"

    @abc.abstractmethod
    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        """Build per-forward metadata (index arrays, planned kernels) before the layers run."""

    @abc.abstractmethod
    def forward_extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        layer: "RadixAttention", forward_batch: "ForwardBatch", save_kv_cache: bool = True,
    ) -> torch.Tensor:
        """q: [T, Hq*D], k/v: [T, Hkv*D] for the new tokens; returns [T, Hq*D].

        save_kv_cache=False: k/v are already in the pool at out_cache_loc; do not store them.
        """

    @abc.abstractmethod
    def forward_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        layer: "RadixAttention", forward_batch: "ForwardBatch", save_kv_cache: bool = True,
    ) -> torch.Tensor:
        """One new token per sequence; same shapes as forward_extend with T == batch size."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        layer: "RadixAttention", forward_batch: "ForwardBatch", save_kv_cache: bool = True,
    ) -> torch.Tensor:
        if forward_batch.forward_mode.is_decode():
            return self.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache)
        return self.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache)

    def forward_decode_rope(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, rotary_emb,
        q_norm, k_norm, layer: "RadixAttention", forward_batch: "ForwardBatch",
    ) -> Optional[torch.Tensor]:
        """Decode attention from q [B, Hq, D] and k [B, Hkv, D] *before* the layer's per-head
        norms (None: none) and rotary embedding, which the backend applies itself while it stores
        k/v: [B, Hq*D], or None where this backend does not fuse them (then the layer applies
        them and calls forward)."""
        return None

    # CUDA graph support (backends that can be captured override these).
    def supports_cuda_graph(self) -> bool:
        return False

    def graph_metadata_kernels(
        self, bs: int, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, shared_prefix: bool = False
    ) -> Optional[Callable[[], None]]:
        """For a decode graph of size ``bs`` on the static buffers ``req_pool_indices`` /
        ``seq_lens``: the metadata kernels to capture inside the graph, after the graph's own
        req_to_token writes (a callable, possibly doing nothing), or None when metadata built
        before replay reads req_to_token, so the batch's writes must precede the replay."""
        return None
