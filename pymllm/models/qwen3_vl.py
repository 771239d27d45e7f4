"""Qwen3-VL: a ViT with DeepStack mergers in front of the Qwen3 decoder with 3-D mrope.

Checkpoint layout (transformers' ``save_pretrained``): ``model.visual.*`` (vision tower),
``model.language_model.*`` (text decoder), ``lm_head.weight``.

The vision tower runs in plain PyTorch in the model dtype and is never quantized (its linears
get ``quant_config=None``). The text decoder is the shared Llama-family decoder layer
(``pymllm.models.llama``) given the mrope embedding, so it runs on every attention backend, in
decode CUDA graphs, and with the fused norm+rope+K/V-write kernel for 1-D positions.

How the engine feeds it (see ``pymllm/executor/multimodal_batch.py``):
- EXTEND: ``positions`` is [3, T] (precomputed mrope positions) when the batch holds an image
  request, else [T]; ``forward_batch.extras["mm"]`` carries the vision rows for the image tokens
  of this batch (a :class:`MultimodalForwardInputs`).
- DECODE: ``positions`` is [T] and ``forward_batch.mrope_position_deltas`` [bs] (or None); the
  rotary position is ``positions + delta`` on all three axes, computed inside ``forward`` so it
  is captured in CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pymllm.engine.forward_batch import ForwardBatch
from pymllm.layers.layernorm import RMSNorm, default_weight_loader
from pymllm.layers.linear import Linear
from pymllm.layers.rotary_embedding import MRotaryEmbedding, apply_rotary
from pymllm.layers.utils import set_weight_attrs
from pymllm.layers.vocab_embedding import LMHead, VocabEmbedding
from pymllm.models.llama import (
    STACKED_PARAMS_MAPPING,
    DecoderAttention,
    DecoderLayer,
    DecoderMLP,
    head_dim_of,
    load_stacked_weights,
)
from pymllm.quantization.base import QuantizationConfig


@dataclass
class MultimodalForwardInputs:
    """Vision rows for one EXTEND batch, in the order of the image tokens in the batch."""

    image_indices: torch.Tensor  # [num_image_tokens] int64: batch rows of the image placeholders
    image_embeds: torch.Tensor  # [num_image_tokens, hidden]
    deepstack_embeds: List[torch.Tensor]  # per DeepStack layer: [num_image_tokens, hidden]


# ---------------------------------------------------------------- vision tower
def _activation(name: str):
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name in ("silu", "swish"):
        return F.silu
    raise ValueError(f"unsupported vision hidden_act {name!r}")


def _layer_norm(size: int) -> nn.LayerNorm:
    norm = nn.LayerNorm(size, eps=1e-6)
    for p in norm.parameters():
        p.requires_grad_(False)
        set_weight_attrs(p, {"weight_loader": default_weight_loader})
    return norm


class VisionPatchEmbed(nn.Module):
    """Conv3d with stride == kernel over (temporal_patch, patch, patch): a linear map of each
    flattened patch [C * T * P * P]; the checkpoint's 5-D conv weight is loaded flattened."""

    def __init__(self, config):
        super().__init__()
        t, p = config.temporal_patch_size, config.patch_size
        self.in_features = config.in_channels * t * p * p
        self.proj = Linear(self.in_features, config.hidden_size, bias=True, quant_config=None,
                           prefix="visual.patch_embed.proj")
        self.proj.weight.weight_loader = self._load_conv_weight

    def _load_conv_weight(self, param, loaded_weight, shard_id=None):
        default_weight_loader(param, loaded_weight.reshape(loaded_weight.shape[0], -1))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values.reshape(-1, self.in_features).to(self.proj.weight.dtype))


class VisionAttention(nn.Module):
    def __init__(self, config, prefix: str):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv = Linear(config.hidden_size, 3 * config.hidden_size, bias=True, quant_config=None,
                          prefix=f"{prefix}.qkv")
        self.proj = Linear(config.hidden_size, config.hidden_size, bias=True, quant_config=None,
                           prefix=f"{prefix}.proj")

    def forward(self, x: torch.Tensor, cu_seqlens: List[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).unbind(1)
        # Rotary in float32, as the reference does, then back to the activation dtype.
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        out = torch.empty_like(q)
        # Each image (frame) attends only to itself: SDPA per segment.
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            seg = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [H, L, D]
            out[start:end] = F.scaled_dot_product_attention(*seg).transpose(0, 1)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, config, prefix: str):
        super().__init__()
        self.linear_fc1 = Linear(config.hidden_size, config.intermediate_size, bias=True, quant_config=None,
                                 prefix=f"{prefix}.linear_fc1")
        self.linear_fc2 = Linear(config.intermediate_size, config.hidden_size, bias=True, quant_config=None,
                                 prefix=f"{prefix}.linear_fc2")
        self.act = _activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config, prefix: str):
        super().__init__()
        self.norm1 = _layer_norm(config.hidden_size)
        self.norm2 = _layer_norm(config.hidden_size)
        self.attn = VisionAttention(config, f"{prefix}.attn")
        self.mlp = VisionMLP(config, f"{prefix}.mlp")

    def forward(self, x, cu_seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class VisionPatchMerger(nn.Module):
    """Merges each spatial_merge_size x spatial_merge_size block of patches into one token of
    the text model's width. ``postshuffle_norm``: LayerNorm over the merged vector (DeepStack
    mergers) instead of over each patch (the final merger)."""

    def __init__(self, config, postshuffle_norm: bool, prefix: str):
        super().__init__()
        self.merged_size = config.hidden_size * config.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = _layer_norm(self.merged_size if postshuffle_norm else config.hidden_size)
        self.linear_fc1 = Linear(self.merged_size, self.merged_size, bias=True, quant_config=None,
                                 prefix=f"{prefix}.linear_fc1")
        self.linear_fc2 = Linear(self.merged_size, config.out_hidden_size, bias=True, quant_config=None,
                                 prefix=f"{prefix}.linear_fc2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged_size))
        else:
            x = self.norm(x).reshape(-1, self.merged_size)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


def vision_patch_coordinates(grid_thw: List[Tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(row, col) of every patch [N, 2], in the processor's order: per frame, merge blocks in
    raster order, and inside each block its merge x merge patches in raster order."""
    coords = []
    for t, h, w in grid_thw:
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
        rc = torch.stack([rows.transpose(1, 2).reshape(-1), cols.transpose(1, 2).reshape(-1)], dim=-1)
        coords.append(rc.repeat(t, 1))
    return torch.cat(coords, dim=0)


class Qwen3VLVisionModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_embed = VisionPatchEmbed(config)
        self.pos_embed = VocabEmbedding(config.num_position_embeddings, config.hidden_size)
        self.num_grid_per_side = int(config.num_position_embeddings**0.5)
        self.blocks = nn.ModuleList(VisionBlock(config, f"visual.blocks.{i}") for i in range(config.depth))
        self.merger = VisionPatchMerger(config, False, "visual.merger")
        self.deepstack_visual_indexes = list(config.deepstack_visual_indexes)
        self.deepstack_merger_list = nn.ModuleList(
            VisionPatchMerger(config, True, f"visual.deepstack_merger_list.{i}")
            for i in range(len(self.deepstack_visual_indexes))
        )
        head_dim = config.hidden_size // config.num_heads
        rope = getattr(config, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", 10000.0))
        quarter = head_dim // 2
        self.register_buffer(
            "rope_inv_freq",
            1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter)),
            persistent=False,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def _position_embeddings(self, grid_thw, coords: torch.Tensor) -> torch.Tensor:
        """The learned square table resampled (bilinear, align_corners) to each image's grid."""
        side = self.num_grid_per_side
        table = self.pos_embed.weight.float().reshape(side, side, -1).permute(2, 0, 1).unsqueeze(0)
        out, start = [], 0
        for t, h, w in grid_thw:
            grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]  # [C, h, w]
            rc = coords[start : start + t * h * w]
            out.append(grid[:, rc[:, 0], rc[:, 1]].t())
            start += t * h * w
        return torch.cat(out, dim=0)

    def _rotary(self, coords: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """2-D rope: the first half of the frequencies rotate by row, the second by column."""
        freqs = coords.to(self.rope_inv_freq.device, torch.float32)[..., None] * self.rope_inv_freq  # [N, 2, D/4]
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)  # [N, D/2]
        return freqs.cos(), freqs.sin()

    def forward(self, pixel_values: torch.Tensor, grid_thw: List[Tuple[int, int, int]]):
        """pixel_values [N, C*T*P*P]; grid_thw per image. Returns (merged [N / m^2, out],
        [DeepStack features [N / m^2, out] per DeepStack layer])."""
        grid_thw = [tuple(int(v) for v in g) for g in grid_thw]
        coords = vision_patch_coordinates(grid_thw, self.spatial_merge_size).to(pixel_values.device)
        x = self.patch_embed(pixel_values)
        x = x + self._position_embeddings(grid_thw, coords).to(x.dtype)
        cos, sin = self._rotary(coords)
        cu_seqlens = [0]
        for t, h, w in grid_thw:
            for _ in range(t):
                cu_seqlens.append(cu_seqlens[-1] + h * w)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cu_seqlens, cos, sin)
            if i in self.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(x))
        return self.merger(x), deepstack


# ---------------------------------------------------------------- text model
class Qwen3VLTextDecoderLayer(DecoderLayer):
    """The shared decoder layer (its forward is DecoderLayer's) around the mrope attention."""

    def __init__(self, config, layer_id: int, rotary_emb, quant_config, prefix: str):
        nn.Module.__init__(self)  # DecoderLayer.__init__ would build the 1-D rope attention
        bias = bool(getattr(config, "attention_bias", False))
        self.self_attn = DecoderAttention(
            config, layer_id, qkv_bias=bias, qk_norm=True, quant_config=quant_config, prefix=f"{prefix}.self_attn",
            o_bias=bias, mrope=rotary_emb,
        )
        self.mlp = DecoderMLP(config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def mrope_parameters(text_config) -> Tuple[List[int], bool]:
    params = dict(getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {})
    section = params.get("mrope_section") or [24, 20, 20]
    return [int(s) for s in section], bool(params.get("mrope_interleaved", True))


class Qwen3VLTextModel(nn.Module):
    def __init__(self, config, quant_config, prefix: str):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        section, interleaved = mrope_parameters(config)
        # One rotary table for all layers (the context can be 256k positions).
        self.rotary_emb = MRotaryEmbedding(
            head_dim_of(config), config.max_position_embeddings, config, section, interleaved
        )
        self.layers = nn.ModuleList(
            Qwen3VLTextDecoderLayer(config, i, self.rotary_emb, quant_config, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, forward_batch, mm: Optional[MultimodalForwardInputs] = None):
        residual = None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(positions, hidden, residual, forward_batch)
            if mm is not None and i < len(mm.deepstack_embeds):
                # DeepStack: add this layer's vision features at the image tokens. The layer's
                # output is hidden + residual (the add is deferred to the next norm).
                hidden = hidden.index_add(0, mm.image_indices, mm.deepstack_embeds[i].to(hidden.dtype))
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Qwen3VLModel(nn.Module):
    def __init__(self, config, quant_config):
        super().__init__()
        self.visual = Qwen3VLVisionModel(config.vision_config)
        self.language_model = Qwen3VLTextModel(config.text_config, quant_config, "model.language_model")


class Qwen3VLForConditionalGeneration(nn.Module):
    stacked_params_mapping = STACKED_PARAMS_MAPPING
    uses_mrope = True

    def __init__(self, config, quant_config: Optional[QuantizationConfig] = None):
        super().__init__()
        self.config = config
        text = config.text_config
        self.image_token_id = int(config.image_token_id)
        self.spatial_merge_size = int(config.vision_config.spatial_merge_size)
        self.model = Qwen3VLModel(config, quant_config)
        self.lm_head = LMHead(text.vocab_size, text.hidden_size)
        self.tie_word_embeddings = bool(
            getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)
        )
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.language_model.embed_tokens)

    # -------- vision
    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor, grid_thw) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """ViT + mergers: (embeds [num_image_tokens, hidden], DeepStack features) for the images
        of one request, rows in placeholder-token order."""
        visual = self.model.visual
        return visual(pixel_values.to(visual.dtype), grid_thw)

    # -------- text
    def forward(self, input_ids, positions, forward_batch: ForwardBatch) -> torch.Tensor:
        """Logits of each sequence's last new token: [batch, vocab]."""
        return self.logits(self.hidden_states(input_ids, positions, forward_batch), forward_batch)

    def hidden_states(self, input_ids, positions, forward_batch: ForwardBatch) -> torch.Tensor:
        """The language model's output [tokens, hidden], the final norm applied, with the batch's
        image embeddings and DeepStack features where it has images."""
        deltas = forward_batch.mrope_position_deltas
        if forward_batch.forward_mode.is_decode() and deltas is not None:
            positions = positions + deltas.view(-1).to(positions.dtype)
        hidden = self.model.language_model.embed_tokens(input_ids)
        mm: Optional[MultimodalForwardInputs] = forward_batch.extras.get("mm")
        if mm is not None:
            hidden = hidden.index_copy(0, mm.image_indices, mm.image_embeds.to(hidden.dtype))
        return self.model.language_model(positions, hidden, forward_batch, mm)

    def logits(self, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        """The LM head over each sequence's last row of ``hidden``."""
        return self.lm_head(forward_batch.last_token_rows(hidden))

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> set:
        # The vision tower has no q/k/v or gate/up projections, so the stacking touches only
        # the language model.
        return load_stacked_weights(
            self, weights, self.stacked_params_mapping, self.tie_word_embeddings, rename=_canonical_name
        )


def _canonical_name(name: str) -> str:
    """Older Qwen-VL exports put the tower at ``visual.*`` and the decoder at ``model.*``."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + name[len("model."):]
    return name
