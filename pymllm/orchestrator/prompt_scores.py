"""Which prompt scores a scoring request can take from the PromptScoreCache, and when it should
wait for them (``SamplingParams.prompt_logprobs``; pymllm.mem_cache.prompt_score_cache)."""

from __future__ import annotations

from typing import Sequence

from pymllm.mem_cache.prompt_score_cache import PromptScoreCache, prefix_keys, shared_prefix
from pymllm.orchestrator.request import Req

# A scoring request waits a batch for another's scores of its prompt when that spares it this many.
MIN_SHARED_SCORES = 32


def reuse_scores(cache: PromptScoreCache, req: Req) -> int:
    """Give ``req`` the scores of its prompt's leading positions that the cache holds, where they
    reach further than its own; returns how many it gained. Positions with scores need not be
    computed, so the prefix cache may then serve their KV. Multimodal prompts take none (their
    image tokens are not what their keys would hash)."""
    if req.mm_inputs is not None:
        return 0
    if req.prompt_score_keys is None:
        req.prompt_score_keys = prefix_keys(req.origin_input_ids)
    found = cache.lookup(req.prompt_score_keys, req.sampling_params.top_logprobs)
    gained = len(found) - len(req.prompt_logprobs)
    if gained <= 0:
        return 0
    req.prompt_logprobs = found
    return gained


def scored_in_batch(req: Req, batch: Sequence[Req]) -> bool:
    """Whether a request of the batch being formed scores at least MIN_SHARED_SCORES positions of
    ``req``'s prompt that ``req`` would otherwise compute too: then ``req`` waits for the next batch
    and takes them from the cache (several continuations of one context arriving together compute
    the context once)."""
    keys = req.prompt_score_keys
    if keys is None:
        return False
    have = len(req.prompt_logprobs)
    return any(other.prompt_score_keys is not None
               and shared_prefix(keys, other.prompt_score_keys) - 1 - have >= MIN_SHARED_SCORES
               for other in batch)
