"""Token embedding and the LM head (which may share the embedding's weight)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pymllm.layers.deferred_norm import DeferredNorm
from pymllm.layers.kernels.gemv_dispatch import dense_linear
from pymllm.layers.layernorm import default_weight_loader
from pymllm.layers.utils import set_weight_attrs

if TYPE_CHECKING:
    from pymllm.layers.layernorm import RMSNorm


class VocabEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)

    def deferred_norm(self, input_ids: torch.Tensor, norm: "RMSNorm") -> DeferredNorm:
        """The embedding rows h as the input of a block whose ``norm`` the consumer applies
        (pymllm.layers.deferred_norm): ``norm.weight * h``, h and the partial sums of h^2."""
        from pymllm.layers.fused_ops import embedding_deferred_norm

        scaled, residual, sumsq = embedding_deferred_norm(input_ids, self.weight, norm.weight)
        return DeferredNorm(scaled, residual, sumsq, norm.variance_epsilon)


class LMHead(VocabEmbedding):
    """Projects hidden states to vocabulary logits; `tie_to` shares the embedding matrix."""

    def tie_to(self, embedding: VocabEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Decode batches stream the whole vocabulary matrix: the GEMV path where it applies.
        return dense_linear(hidden, self.weight)
