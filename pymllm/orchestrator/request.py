"""A request's scheduling state: plain Python, no tensors."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np

from pymllm.engine.io_struct import FinishReason, TokenLogprob
from pymllm.sampling_params import SamplingParams


class ReqState(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"  # admitted; prompt (or a chunk of it) still being computed
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass
class Req:
    rid: str
    origin_input_ids: List[int]
    sampling_params: SamplingParams
    seed: int
    stream: bool = False
    output_ids: List[int] = field(default_factory=list)
    state: ReqState = ReqState.WAITING
    # KV bookkeeping
    req_pool_idx: Optional[int] = None
    kv_slots: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    prefix_handle: Any = None  # prefix-cache lock held while running
    cache_owned_len: int = 0  # leading kv_slots owned by the prefix cache, not by this request
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    finish_reason: Optional[FinishReason] = None
    logprobs: List[TokenLogprob] = field(default_factory=list)
    num_sent_tokens: int = 0  # output tokens already reported to the detokenizer
    num_sent_logprobs: int = 0
    retractions: int = 0
    # Images (pymllm.multimodal.MultimodalInputs) of a multimodal request, else None.
    mm_inputs: Any = None

    @property
    def fill_ids(self) -> List[int]:
        """Tokens whose KV must exist before the next token can be sampled."""
        return self.origin_input_ids + self.output_ids

    def cache_key(self, n: Optional[int] = None) -> List[int]:
        """Prefix-cache key of the first n fill ids (all by default): token ids, with each
        image's placeholder tokens standing for that image's content hash."""
        ids = self.fill_ids if n is None else self.fill_ids[:n]
        if self.mm_inputs is None:
            return ids
        from pymllm.multimodal.inputs import cache_key

        return cache_key(ids, self.mm_inputs)

    @property
    def kv_len(self) -> int:
        return int(self.kv_slots.size)

    @property
    def prompt_len(self) -> int:
        return len(self.origin_input_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
