"""How FlashInferAttnBackend attends for an extend on top of a cached prefix.

An extend batch where some sequence already has KV in the pool (chunked prefill, prefix-cache
hit, mixed batch) can be computed several ways; ``FlashInferAttnBackend(runner,
extend_strategy=...)`` picks one, ``DEFAULT_EXTEND_STRATEGY`` when not given:

- ``"paged"``: one causal ``BatchPrefillWithPagedKVCacheWrapper`` (backend "auto", i.e. FA3 on
  SM90) over prefix + new tokens through kv_indices (the new K/V are stored first).
- ``"paged_fa2"``: the same wrapper created with ``backend="fa2"``. FA2's plan splits long KV
  ranges over several CTAs when there are few query rows, and its merge of the partial results
  is part of the run; FlashInfer's FA3 path has no KV split, so a short extend over a long
  prefix keeps only (query tiles x heads) CTAs busy.
- ``"cascade"`` / ``"cascade_fa2"``: causal ``BatchPrefillWithRaggedKVCacheWrapper`` over the
  new tokens' own k/v (straight from the projection, as for a plain prefill), plus a
  non-causal paged prefill over the prefix only, merged with ``flashinfer.merge_state_in_place``.
  Both runs return the log-sum-exp of their scores (``return_lse=True``; FlashInfer's LSE is in
  base 2 and ``merge_state*`` expects exactly that). The prefix wrapper uses backend "auto" or
  "fa2"; the ragged one is the plain-prefill wrapper ("auto").

Cascade details:
- A sequence with no cached prefix in a mixed batch gets a one-key stand-in range (the first
  slot of its row, i.e. its own first new token, already stored) so that no KV range handed to
  FlashInfer is empty; its prefix state is then left out of the merge by the merge mask.
- The prefix pass is non-causal, and FlashInfer places query i of a sequence at position
  ``kv_len - qo_len + i`` of the KV it is given, which is wrong for the prefix-only range once
  a window limits what a query sees. Models with a sliding window therefore fall back to
  ``"paged"`` (same backend) for these batches.

The default is the one rule here; the measured comparison lives in docs/perf/README.md
("Attention") and ``scripts/profile_extend.py`` reproduces it.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from pymllm.configs.errors import ConfigError

EXTEND_STRATEGIES = ("paged", "paged_fa2", "cascade", "cascade_fa2")
# Measured on an H200 (docs/perf/profile_extend_h200.jsonl; Qwen3-8B shape, 32 new tokens on
# 2,000 cached, eager): paged 38.7 ms, paged_fa2 18.8 ms, cascade 22.1 ms, cascade_fa2 25.5 ms.
DEFAULT_EXTEND_STRATEGY = "paged_fa2"


def check_extend_strategy(strategy: Optional[str]) -> str:
    """The strategy to use (the default for None); ConfigError for an unknown name."""
    if strategy is None:
        return DEFAULT_EXTEND_STRATEGY
    if strategy not in EXTEND_STRATEGIES:
        raise ConfigError(f"flashinfer extend strategy {strategy!r}: expected one of {', '.join(EXTEND_STRATEGIES)}")
    return strategy


def prefix_prefill_backend(strategy: str) -> str:
    """FlashInfer backend of the paged prefill wrappers that read a cached prefix."""
    return "fa2" if strategy.endswith("_fa2") else "auto"


def extend_kind(strategy: str, prefix_lens: Sequence[int], window_lefts: Tuple[int, ...]) -> str:
    """"ragged" (nothing cached), "cascade" or "paged" for one extend batch."""
    if all(p == 0 for p in prefix_lens):
        return "ragged"
    if strategy.startswith("cascade") and tuple(window_lefts) == (-1,):
        return "cascade"
    return "paged"


def cascade_prefix_lens(prefix_lens: Sequence[int]) -> list:
    """KV length of each sequence's prefix range: one stand-in key where nothing is cached."""
    return [max(int(p), 1) for p in prefix_lens]


def cascade_merge_mask(fb, num_tokens: int) -> Optional[torch.Tensor]:
    """Per new token: whether its sequence has a cached prefix (None when all of them do).

    Built on the device from the batch's device-side lengths (no host round trip).
    """
    if all(p > 0 for p in fb.extend_prefix_lens_cpu):
        return None
    has_prefix = fb.extend_prefix_lens > 0
    return torch.repeat_interleave(has_prefix, fb.extend_seq_lens.to(torch.int64), output_size=num_tokens)


def run_cascade(flashinfer, ragged, prefix, q, k, v, kv_buffers, merge_mask):
    """Attention of the new tokens over their own k/v (causal) and over the cached prefix."""
    out, lse = ragged.run(q, k, v, return_lse=True)
    prefix_out, prefix_lse = prefix.run(q, kv_buffers, return_lse=True)
    flashinfer.merge_state_in_place(out, lse, prefix_out, prefix_lse, mask=merge_mask)
    return out
