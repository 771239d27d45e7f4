"""Reference attention over the paged KV cache with plain PyTorch (CPU and GPU)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from pymllm.engine.forward_batch import ForwardBatch
from pymllm.layers.attention.base_backend import AttentionBackend


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    # [.., Hkv, L, D] -> [.., Hkv * groups, L, D]; SDPA's enable_gqa needs torch >= 2.5.
    return x if groups == 1 else x.repeat_interleave(groups, dim=-3)


class TorchNativeAttnBackend(AttentionBackend):
    name = "torch_native"

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        # Everything is read straight from req_to_token during the forward.
        pass

    def _store(self, k, v, layer, forward_batch: ForwardBatch) -> None:
        k = k.view(-1, layer.num_kv_heads, layer.head_dim)
        v = v.view(-1, layer.num_kv_heads, layer.head_dim)
        forward_batch.kv_pool.set_kv(layer.layer_id, forward_batch.out_cache_loc, k, v)

    def forward_extend(self, q, k, v, layer, forward_batch: ForwardBatch, save_kv_cache: bool = True):
        if save_kv_cache:
            self._store(k, v, layer, forward_batch)
        k_buf, v_buf = forward_batch.kv_pool.get_kv_buffer(layer.layer_id)
        req_to_token = forward_batch.req_to_token_pool.req_to_token
        q = q.view(-1, layer.num_heads, layer.head_dim)
        out = torch.empty_like(q)
        groups = layer.num_heads // layer.num_kv_heads
        start = 0
        req_indices = forward_batch.req_pool_indices.tolist()
        for i, (extend_len, prefix_len) in enumerate(
            zip(forward_batch.extend_seq_lens_cpu, forward_batch.extend_prefix_lens_cpu)
        ):
            total = prefix_len + extend_len
            slots = req_to_token[req_indices[i], :total].long()
            keys = k_buf[slots].transpose(0, 1)  # [Hkv, L, D]
            values = v_buf[slots].transpose(0, 1)
            query = q[start : start + extend_len].transpose(0, 1)  # [Hq, Lq, D]
            q_pos = torch.arange(prefix_len, total, device=q.device)
            k_pos = torch.arange(total, device=q.device)
            mask = _attention_mask(q_pos, k_pos, layer.sliding_window)
            o = F.scaled_dot_product_attention(
                query.unsqueeze(0),
                _expand_kv(keys, groups).unsqueeze(0).to(q.dtype),
                _expand_kv(values, groups).unsqueeze(0).to(q.dtype),
                attn_mask=mask,
                scale=layer.scaling,
            )
            out[start : start + extend_len] = o[0].transpose(0, 1)
            start += extend_len
        return out.view(-1, layer.num_heads * layer.head_dim)

    def forward_decode(self, q, k, v, layer, forward_batch: ForwardBatch, save_kv_cache: bool = True):
        if save_kv_cache:
            self._store(k, v, layer, forward_batch)
        k_buf, v_buf = forward_batch.kv_pool.get_kv_buffer(layer.layer_id)
        bs = forward_batch.batch_size
        max_len = max(forward_batch.seq_lens_cpu)
        slots = forward_batch.req_to_token_pool.req_to_token[
            forward_batch.req_pool_indices, :max_len
        ].long()  # [B, L]; entries past a sequence's length are masked below
        keys = k_buf[slots].permute(0, 2, 1, 3)  # [B, Hkv, L, D]
        values = v_buf[slots].permute(0, 2, 1, 3)
        groups = layer.num_heads // layer.num_kv_heads
        query = q.view(bs, layer.num_heads, 1, layer.head_dim)
        k_pos = torch.arange(max_len, device=q.device)
        seq_lens = forward_batch.seq_lens.to(q.device).long()
        mask = k_pos[None, :] < seq_lens[:, None]  # [B, L]
        if layer.sliding_window is not None:
            mask &= k_pos[None, :] > (seq_lens[:, None] - 1 - layer.sliding_window)
        o = F.scaled_dot_product_attention(
            query,
            _expand_kv(keys, groups).to(q.dtype),
            _expand_kv(values, groups).to(q.dtype),
            attn_mask=mask[:, None, None, :],
            scale=layer.scaling,
        )
        return o.reshape(bs, layer.num_heads * layer.head_dim)


def _attention_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: Optional[int]
) -> torch.Tensor:
    mask = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return mask
