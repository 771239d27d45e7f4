"""What the scheduler asks the ModelRunner to run, and what comes back. No tensors here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from pymllm.engine.forward_batch import ForwardMode
from pymllm.engine.io_struct import TokenLogprob
from pymllm.orchestrator.request import Req


@dataclass
class ScheduledBatch:
    mode: ForwardMode
    reqs: List[Req]
    # Per request: position of the first new token (= tokens already in the KV cache) and
    # how many new tokens this step computes.
    prefix_lens: List[int]
    extend_lens: List[int]
    # KV slots of every new token, requests in order.
    out_cache_loc: np.ndarray
    # Per request: whether this step ends its prompt (a token is sampled) or is a middle chunk.
    sample: List[bool] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.reqs)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.extend_lens))


@dataclass
class BatchResult:
    next_token_ids: List[int]
    # Per request (None where logprobs were not asked): chosen logprob and top list.
    logprobs: List[Optional[tuple]]
    # Per request, the prompt tokens this batch scored (SamplingParams.prompt_logprobs), in
    # order; None when no request of the batch asked.
    prompt_logprobs: Optional[List[List[TokenLogprob]]] = None
