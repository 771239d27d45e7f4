"""The attention layer: delegates to the batch's attention backend."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pymllm.engine.forward_batch import ForwardBatch


class RadixAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scaling: float,
        num_kv_heads: int,
        layer_id: int,
        sliding_window: Optional[int] = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.num_kv_heads = num_kv_heads
        self.layer_id = layer_id
        self.sliding_window = sliding_window

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
    ) -> torch.Tensor:
        """save_kv_cache=False: the caller has already written k/v at out_cache_loc (fused)."""
        return forward_batch.attn_backend.forward(q, k, v, self, forward_batch, save_kv_cache=save_kv_cache)

    def forward_rope(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, rotary_emb,
        q_norm, k_norm, forward_batch: ForwardBatch,
    ) -> Optional[torch.Tensor]:
        """Attention of a decode batch from q/k before their norms and rope, where the backend
        fuses those and the KV store into its kernel (AttentionBackend.forward_decode_rope); None
        otherwise, and nothing has run."""
        if not forward_batch.forward_mode.is_decode() or forward_batch.kv_pool is None:
            return None
        return forward_batch.attn_backend.forward_decode_rope(
            q, k, v, positions, rotary_emb, q_norm, k_norm, self, forward_batch
        )
