"""A request's scheduling state: plain Python, no tensors."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

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
    # KV slot ids in token order, in a buffer that grows by doubling: decode appends one slot
    # per step, and re-concatenating the whole array each step would cost O(length).
    _kv_buf: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64), repr=False)
    _kv_len: int = 0
    prefix_handle: Any = None  # prefix-cache lock held while running
    cache_owned_len: int = 0  # leading kv_slots owned by the prefix cache, not by this request
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    finish_reason: Optional[FinishReason] = None
    logprobs: List[TokenLogprob] = field(default_factory=list)
    num_sent_tokens: int = 0  # output tokens already reported to the detokenizer
    num_sent_logprobs: int = 0
    # With sampling_params.prompt_logprobs: entry i scores prompt token i + 1 (from the logits
    # at position i), filled chunk by chunk as the prompt is prefilled.
    prompt_logprobs: List[TokenLogprob] = field(default_factory=list)
    # The prompt's keys in the scheduler's PromptScoreCache (pymllm.mem_cache.prompt_score_cache),
    # computed once when a scoring request is first considered for admission.
    prompt_score_keys: Optional[List[Tuple[int, int]]] = field(default=None, repr=False)
    retractions: int = 0
    # Images (pymllm.multimodal.MultimodalInputs) of a multimodal request, else None.
    mm_inputs: Any = None
    # The xgrammar matcher of a request with sampling_params.json_schema: the tokens it allows
    # next mask the logits, and every token sampled is fed to it (pymllm.orchestrator.grammar).
    grammar: Any = None

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
    def kv_slots(self) -> np.ndarray:
        return self._kv_buf[: self._kv_len]

    @kv_slots.setter
    def kv_slots(self, slots: np.ndarray) -> None:
        self._kv_buf = np.array(slots, dtype=np.int64)
        self._kv_len = int(self._kv_buf.size)

    def append_kv_slots(self, slots: np.ndarray) -> None:
        n = len(slots)
        if self._kv_len + n > self._kv_buf.size:
            grown = np.empty(max(2 * self._kv_buf.size, self._kv_len + n, 64), dtype=np.int64)
            grown[: self._kv_len] = self._kv_buf[: self._kv_len]
            self._kv_buf = grown
        self._kv_buf[self._kv_len : self._kv_len + n] = slots
        self._kv_len += n

    @property
    def kv_len(self) -> int:
        return self._kv_len

    @property
    def prompt_len(self) -> int:
        return len(self.origin_input_ids)

    @property
    def prompt_logprobs_pending(self) -> bool:
        """Whether prompt positions are still to be scored: their logits must be computed, so
        no prefix-cache hit may skip them."""
        return self.sampling_params.prompt_logprobs and len(self.prompt_logprobs) < self.prompt_len - 1

    def prompt_rows_to_score(self, prefix_len: int, extend_len: int) -> Tuple[int, int]:
        """(first row, row count) among an extend's ``extend_len`` new rows, starting at
        position ``prefix_len``, whose logits score a prompt token not scored yet."""
        if not self.sampling_params.prompt_logprobs:
            return 0, 0
        start = max(prefix_len, len(self.prompt_logprobs))
        # The logits at position p score token p + 1; the last prompt position's logits pick
        # the first new token instead.
        end = min(prefix_len + extend_len, self.prompt_len - 1)
        return start - prefix_len, max(0, end - start)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
