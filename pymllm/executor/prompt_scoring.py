"""Prompt logprobs (``SamplingParams.prompt_logprobs``): scoring an extend batch's prompt tokens.

The model applies its LM head to each sequence's last row only. Rows that score prompt tokens
are set aside during the forward (``ForwardBatch.prompt_hidden``) and scored here, a chunk of
rows at a time: the logits of a long prompt over a 150k-token vocabulary do not fit at once
(2,048 rows of Qwen3's are 1.2 GiB in float32). The logprobs are the raw model's, computed as the
sampler computes those of generated tokens (``sampler.raw_logprobs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from pymllm.engine.io_struct import TokenLogprob
from pymllm.layers.sampler import raw_logprobs
from pymllm.orchestrator.schedule_batch import ScheduledBatch

# Rows of logits held at once: 512 x 152k bf16 (Qwen3's vocabulary) are 155 MiB.
SCORING_CHUNK_ROWS = 512


@dataclass
class PromptScoring:
    rows: List[int]  # rows of the batch's tokens, request by request
    targets: List[int]  # the prompt token each row's logits score (the one after it)
    counts: List[int]  # rows per request
    top_k: List[int]  # alternatives per request (its top_logprobs)


def plan_prompt_scoring(batch: ScheduledBatch) -> Optional[PromptScoring]:
    """The rows of ``batch`` that score prompt tokens, or None where no request asks."""
    if not batch.mode.is_extend():  # decode steps (the hot path) score nothing
        return None
    spans = [req.prompt_rows_to_score(p, n) for req, p, n in zip(batch.reqs, batch.prefix_lens, batch.extend_lens)]
    if not any(count for _, count in spans):
        return None
    rows: List[int] = []
    targets: List[int] = []
    base = 0
    for req, prefix, n, (first, count) in zip(batch.reqs, batch.prefix_lens, batch.extend_lens, spans):
        rows.extend(range(base + first, base + first + count))
        targets.extend(req.origin_input_ids[prefix + first + 1 : prefix + first + count + 1])
        base += n
    return PromptScoring(rows, targets, [count for _, count in spans],
                         [req.sampling_params.top_logprobs for req in batch.reqs])


@torch.inference_mode()
def score_prompt_rows(
    lm_head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, scoring: PromptScoring,
    chunk_rows: int = SCORING_CHUNK_ROWS,
) -> List[List[TokenLogprob]]:
    """Per request, (token, logprob, top alternatives) of each prompt token its rows score;
    ``hidden`` holds the rows of ``scoring.rows`` in order."""
    if hidden.shape[0] != len(scoring.rows):
        raise ValueError(f"score_prompt_rows: {hidden.shape[0]} hidden rows for {len(scoring.rows)} scored rows")
    targets = torch.tensor(scoring.targets, dtype=torch.int64, device=hidden.device)
    k = max(scoring.top_k)
    chosen, top_vals, top_ids = [], [], []
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        picked, vals, ids = raw_logprobs(lm_head(hidden[rows]), targets[rows], k)
        chosen.append(picked)
        if k:
            top_vals.append(vals)
            top_ids.append(ids)
    chosen_host = torch.cat(chosen).tolist()
    vals_host = torch.cat(top_vals).tolist() if k else None
    ids_host = torch.cat(top_ids).tolist() if k else None
    out: List[List[TokenLogprob]] = []
    row = 0
    # Whole-request zips rather than a loop indexing row by row: 5-7x faster at 1,024 rows, and
    # this runs on the scheduler's loop.
    for count, req_k in zip(scoring.counts, scoring.top_k):
        end = row + count
        if req_k:
            tops = [list(zip(ids[:req_k], vals[:req_k])) for ids, vals in zip(ids_host[row:end], vals_host[row:end])]
        else:
            tops = [[] for _ in range(count)]
        out.append(list(zip(scoring.targets[row:end], chosen_host[row:end], tops)))
        row = end
    return out
