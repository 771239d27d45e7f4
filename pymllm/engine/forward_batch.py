"""ForwardMode and ForwardBatch: the tensors one model forward needs.

The scheduler describes a batch with plain Python lists (ScheduleBatch); the ModelRunner turns
it into a ForwardBatch on the model's device. Layers read attention metadata through
``forward_batch.attn_backend``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional

import torch

if TYPE_CHECKING:
    from pymllm.layers.attention.base_backend import AttentionBackend
    from pymllm.mem_cache.memory_pool import KVPool, ReqToTokenPool


class ForwardMode(enum.IntEnum):
    EXTEND = 1  # prefill, possibly on top of a cached prefix (chunked prefill)
    DECODE = 2  # one new token per sequence
    MIXED = 3  # extend and decode sequences in one batch

    def is_extend(self) -> bool:
        return self in (ForwardMode.EXTEND, ForwardMode.MIXED)

    def is_decode(self) -> bool:
        return self == ForwardMode.DECODE


@dataclass
class ForwardBatch:
    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens] (or [3, num_tokens] for mrope)
    req_pool_indices: torch.Tensor  # [bs] int64
    seq_lens: torch.Tensor  # [bs] int32: total length after this forward
    out_cache_loc: torch.Tensor  # [num_tokens] int64: KV slot of every new token
    seq_lens_cpu: List[int]
    # EXTEND only: new tokens per sequence, and the already-cached prefix per sequence.
    extend_seq_lens_cpu: Optional[List[int]] = None
    extend_prefix_lens_cpu: Optional[List[int]] = None
    extend_seq_lens: Optional[torch.Tensor] = None
    extend_prefix_lens: Optional[torch.Tensor] = None
    # Wiring filled by the ModelRunner.
    req_to_token_pool: Optional["ReqToTokenPool"] = None
    kv_pool: Optional["KVPool"] = None
    attn_backend: Optional["AttentionBackend"] = None
    # Qwen3-VL mrope: per-request position offset carried into decode.
    mrope_position_deltas: Optional[torch.Tensor] = None
    # An extend run as decode rows (one per new token): the row of each request's last token,
    # whose logits are the request's.
    sample_rows: Optional[List[int]] = None
    # Rows whose hidden states score prompt tokens (SamplingParams.prompt_logprobs); the forward
    # sets them aside in prompt_hidden, and the runner applies the LM head to them in chunks.
    prompt_logprob_rows: Optional[torch.Tensor] = None
    prompt_hidden: Optional[torch.Tensor] = None
    extras: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def last_token_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each sequence's last new token's row of ``hidden`` [tokens, ...]. A decode batch has
        one token per sequence, so that is ``hidden`` itself: no index kernels in a decode step
        (an arange and a gather, ~4 us of a Qwen3-8B graph on an H200). The rows listed in
        ``prompt_logprob_rows`` are kept in ``prompt_hidden`` on the way."""
        if self.prompt_logprob_rows is not None:
            self.prompt_hidden = hidden[self.prompt_logprob_rows]
        if self.forward_mode.is_decode():
            return hidden
        assert self.extend_seq_lens is not None
        return hidden[torch.cumsum(self.extend_seq_lens, dim=0) - 1]
