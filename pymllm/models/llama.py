"""Llama-family decoder (Llama, Qwen2, Qwen3 share it; they differ in bias and q/k norm)."""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from pymllm.engine.forward_batch import ForwardBatch
from pymllm.layers.deferred_norm import DeferredNorm
from pymllm.layers.fused_ops import KVCacheWrite, qk_norm_rope_try_store_kv
from pymllm.layers.layernorm import RMSNorm
from pymllm.layers.linear import Linear, LinearBase, MergedLinear, QKVLinear, norm_with_residual
from pymllm.layers.radix_attention import RadixAttention
from pymllm.layers.rotary_embedding import RotaryEmbedding
from pymllm.layers.vocab_embedding import LMHead, VocabEmbedding
from pymllm.quantization.base import QuantizationConfig


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class DecoderAttention(nn.Module):
    def __init__(
        self,
        config,
        layer_id: int,
        qkv_bias: bool,
        qk_norm: bool,
        quant_config: Optional[QuantizationConfig],
        prefix: str,
        o_bias: bool = False,
        mrope: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVLinear(
            config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads,
            bias=qkv_bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = Linear(
            self.q_size, config.hidden_size, bias=o_bias,
            quant_config=quant_config, prefix=f"{prefix}.o_proj",
        )
        eps = getattr(config, "rms_norm_eps", 1e-6)
        self.q_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        if mrope is None:
            self.rotary_emb = RotaryEmbedding(self.head_dim, config.max_position_embeddings, config)
            self._mrope: List[nn.Module] = []
        else:
            # Multimodal rope, shared by all layers (a list keeps it out of the module tree):
            # 3-D positions go through it; 1-D ones (text, decode) use its plain table.
            self.rotary_emb = mrope.base
            self._mrope = [mrope]
        sliding_window = _sliding_window_for(config, layer_id)
        self.attn = RadixAttention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads, layer_id, sliding_window
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        return self.o_proj(self.attend(positions, self.qkv_proj(hidden), forward_batch))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        """Attention from the qkv projection (which the decoder layer may compute together with its
        input norm), before o_proj (which the layer may run together with the residual add)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        if positions.dim() != 1:  # mrope positions [3, T] (image prompts)
            q, k = self._mrope[0](positions, self.q_norm(q), self.k_norm(k))
            return self.attn(q.reshape(-1, self.q_size), k.reshape(-1, self.kv_size), v, forward_batch)
        v_heads = v.reshape(-1, self.num_kv_heads, self.head_dim)
        # Decode attention may take q/k raw and apply the norms and rope itself (one launch).
        out = self.attn.forward_rope(
            q, k, v_heads, positions, self.rotary_emb, self.q_norm, self.k_norm, forward_batch
        )
        if out is not None:
            return out
        # The norm+rope kernel can also store this layer's K/V, which saves the backend's
        # store launch per layer. It writes through forward_batch.out_cache_loc, the static
        # buffer under CUDA graphs, so a captured graph writes each replay's slots.
        kv_write = None
        if forward_batch.kv_pool is not None:
            k_cache, v_cache = forward_batch.kv_pool.get_kv_buffer(self.attn.layer_id)
            kv_write = KVCacheWrite(v_heads, k_cache, v_cache, forward_batch.out_cache_loc)
        q, k, stored = qk_norm_rope_try_store_kv(
            q, k, positions, self.rotary_emb, self.q_norm, self.k_norm, kv_write
        )
        return self.attn(
            q.reshape(-1, self.q_size), k.reshape(-1, self.kv_size), v, forward_batch, save_kv_cache=not stored
        )


def _sliding_window_for(config, layer_id: int) -> Optional[int]:
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", False):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_id] != "sliding_attention":
        return None
    return int(window)


class DecoderMLP(nn.Module):
    def __init__(self, config, quant_config, prefix: str):
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} (only silu)")
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=bias,
            quant_config=quant_config, prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = Linear(
            config.intermediate_size, config.hidden_size, bias=bias,
            quant_config=quant_config, prefix=f"{prefix}.down_proj",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._from_normed(x, None, None)[0]

    def forward_prenorm(
        self, x: Union[torch.Tensor, DeferredNorm], residual: Optional[torch.Tensor], norm: RMSNorm,
        next_block: Optional[Tuple[RMSNorm, LinearBase]] = None,
    ) -> Tuple[Union[torch.Tensor, DeferredNorm], torch.Tensor]:
        """``(self(norm(x [+ residual])), x [+ residual])``. Where the norm runs inside the gate/up
        GEMV, the SiLU-and-mul goes into the down projection (a GEMV has one fused side). ``x`` may
        be a DeferredNorm (the add done, the norm left to gate/up). ``next_block`` (the next
        block's norm and its first projection) lets down_proj hand its sum on as a DeferredNorm."""
        if isinstance(x, DeferredNorm):
            act = self.gate_up_proj.forward_swiglu_normed(x)
            if act is not None:
                return self._down(act, x.residual, next_block)
            return self._from_normed(x.materialize(norm), x.residual, next_block)
        fused = self.gate_up_proj.fused_rmsnorm(x, residual, norm)
        if fused is not None:
            gate_up, residual = fused
            return self.down_proj.forward_silu_mul(gate_up), residual
        hidden, residual = norm_with_residual(x, residual, norm)
        return self._from_normed(hidden, residual, next_block)

    def _from_normed(
        self, hidden: torch.Tensor, residual: Optional[torch.Tensor], next_block: Optional[Tuple[RMSNorm, LinearBase]]
    ) -> Tuple[Union[torch.Tensor, DeferredNorm], Optional[torch.Tensor]]:
        # The SiLU-and-mul runs as the gate/up GEMV's epilogue, or in the down projection's
        # prologue, or on its own: whichever kernels the decode measurements picked.
        act = self.gate_up_proj.forward_swiglu(hidden)
        if act is None:
            return self.down_proj.forward_silu_mul(self.gate_up_proj(hidden)), residual
        return self._down(act, residual, next_block)

    def _down(
        self, act: torch.Tensor, residual: Optional[torch.Tensor], next_block: Optional[Tuple[RMSNorm, LinearBase]]
    ) -> Tuple[Union[torch.Tensor, DeferredNorm], Optional[torch.Tensor]]:
        if next_block is not None:  # only forward_prenorm passes one, always with its residual
            return self.down_proj.forward_add_norm(act, residual, *next_block)
        return self.down_proj(act), residual


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_id: int, qkv_bias: bool, qk_norm: bool, quant_config, prefix: str,
                 o_bias: bool = False):
        super().__init__()
        self.self_attn = DecoderAttention(
            config, layer_id, qkv_bias, qk_norm, quant_config, f"{prefix}.self_attn", o_bias
        )
        self.mlp = DecoderMLP(config, quant_config, f"{prefix}.mlp")
        eps = getattr(config, "rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, positions, hidden, residual, forward_batch, next_layer: Optional["DecoderLayer"] = None):
        # Each norm runs inside the projection that consumes it where a fused decode GEMV
        # exists (Linear.forward_rmsnorm), as does the SiLU-and-mul (DecoderMLP); at one row the
        # W4A16 GEMVs defer each norm across it (o_proj -> gate/up, down -> the next layer's qkv;
        # pymllm.layers.deferred_norm), so `hidden` may arrive as a DeferredNorm.
        qkv, residual = self.self_attn.qkv_proj.forward_rmsnorm(hidden, residual, self.input_layernorm)
        attn = self.self_attn.attend(positions, qkv, forward_batch)
        hidden, residual = self.self_attn.o_proj.forward_add_norm(
            attn, residual, self.post_attention_layernorm, self.mlp.gate_up_proj, gated=True
        )
        next_block = None
        if next_layer is not None:
            next_block = (next_layer.input_layernorm, next_layer.self_attn.qkv_proj)
        return self.mlp.forward_prenorm(hidden, residual, self.post_attention_layernorm, next_block)


class DecoderModel(nn.Module):
    def __init__(self, config, qkv_bias: bool, qk_norm: bool, quant_config, prefix: str = "model",
                 o_bias: bool = False):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, qkv_bias, qk_norm, quant_config, f"{prefix}.layers.{i}", o_bias)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, getattr(config, "rms_norm_eps", 1e-6))

    def forward(self, input_ids, positions, forward_batch, input_embeds=None):
        hidden = self.embed(input_ids) if input_embeds is None else input_embeds
        residual = None
        for i, layer in enumerate(self.layers):
            next_layer = self.layers[i + 1] if i + 1 < len(self.layers) else None
            hidden, residual = layer(positions, hidden, residual, forward_batch, next_layer)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def embed(self, input_ids: torch.Tensor) -> Union[torch.Tensor, DeferredNorm]:
        """The token embeddings; where the first layer's qkv consumes a deferred norm (one-row
        decode GEMVs), as the producer of its input norm (``VocabEmbedding.deferred_norm``), so
        that norm runs inside the qkv GEMV like every later one."""
        first = self.layers[0]
        qkv = first.self_attn.qkv_proj
        like = self.embed_tokens.weight[: input_ids.numel()]
        if input_ids.dim() == 1 and qkv.takes_deferred_norm(like):
            return self.embed_tokens.deferred_norm(input_ids, first.input_layernorm)
        return self.embed_tokens(input_ids)


# checkpoint projection -> (stacked parameter, shard id)
STACKED_PARAMS_MAPPING = [
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]


def load_stacked_weights(
    model: nn.Module,
    weights: Iterable[Tuple[str, torch.Tensor]],
    stacked_params_mapping,
    tie_word_embeddings: bool,
    rename=None,
) -> set:
    """Load checkpoint tensors into `model`, stacking q/k/v and gate/up shards into their fused
    parameters; `rename` maps a checkpoint name onto the model's naming first. Returns the names
    of the parameters that were filled."""
    from pymllm.layers.layernorm import default_weight_loader

    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    for name, tensor in weights:
        name = rename(name) if rename is not None else name
        if "rotary_emb.inv_freq" in name:
            continue
        if tie_word_embeddings and name.startswith("lm_head."):
            continue  # tied: the embedding provides it
        target, shard_id = name, None
        for stacked, ckpt, sid in stacked_params_mapping:
            if f".{ckpt}." in name:
                target, shard_id = name.replace(f".{ckpt}.", f".{stacked}."), sid
                break
        param = params.get(target)
        if param is None:
            raise KeyError(f"checkpoint tensor {name!r} has no matching parameter")
        loader = getattr(param, "weight_loader", default_weight_loader)
        if shard_id is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard_id)
        loaded.add(target)
    return loaded


class LlamaForCausalLM(nn.Module):
    stacked_params_mapping = STACKED_PARAMS_MAPPING
    qkv_bias = False  # q/k/v bias regardless of config.attention_bias (Qwen2)
    qk_norm = False
    # Llama and Qwen3 put config.attention_bias on q, k, v and o; Qwen2 has bias on q/k/v only.
    o_bias_follows_config = True

    def __init__(self, config, quant_config: Optional[QuantizationConfig] = None):
        super().__init__()
        self.config = config
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = self.qkv_bias or attention_bias
        o_bias = attention_bias and self.o_bias_follows_config
        self.model = DecoderModel(config, qkv_bias, self.qk_norm, quant_config, o_bias=o_bias)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids, positions, forward_batch: ForwardBatch) -> torch.Tensor:
        """Returns logits of each sequence's last new token: [batch, vocab]."""
        return self.logits(self.hidden_states(input_ids, positions, forward_batch), forward_batch)

    def hidden_states(self, input_ids, positions, forward_batch: ForwardBatch) -> torch.Tensor:
        """The decoder's output [tokens, hidden], the final norm applied (what the LM head reads)."""
        return self.model(input_ids, positions, forward_batch)

    def logits(self, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        """The LM head over each sequence's last row of the decoder's output ``hidden``."""
        return self.lm_head(forward_batch.last_token_rows(hidden))

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> set:
        """Load checkpoint tensors; returns the set of parameter names that were filled."""
        return load_stacked_weights(self, weights, self.stacked_params_mapping, self.tie_word_embeddings)
