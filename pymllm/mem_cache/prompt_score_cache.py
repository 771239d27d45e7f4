"""Scored prompt positions kept for reuse (``SamplingParams.prompt_logprobs``).

A scoring request needs the logits of every prompt position, so the prefix cache alone cannot
spare it any compute: positions whose KV is cached are never run. But a position's score (the
logprob of the next prompt token and its top alternatives) depends only on the tokens up to and
including that next token, so a request scoring a prompt that shares a prefix with one scored
before can take the scores of that prefix from here, and then the KV of that prefix from the
prefix cache (the scheduler lets a request skip exactly the positions it already has scores for).
Multiple-choice evaluation scores one context with several continuations this way, computing the
context once (the scheduler holds back a continuation that arrives beside another by one batch,
``pymllm.orchestrator.prompt_scores``).

Each entry is keyed by two independent hash chains over the tokens it depends on (a 128-bit key:
a collision is not a practical concern) and holds the score with as many top alternatives as its
request asked for; a request asking for more cannot use it. Entries are evicted least recently
used, ``max_entries`` at most.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence, Tuple

from pymllm.engine.io_struct import TokenLogprob

DEFAULT_MAX_ENTRIES = 262_144  # ~100 MB at 5 alternatives per entry
_SALT = 0x9E3779B97F4A7C15

Key = Tuple[int, int]


def shared_prefix(a: Sequence[Key], b: Sequence[Key]) -> int:
    """How many leading tokens two prompts with these ``prefix_keys`` share (each key covers all
    before it, so a binary search finds the first that differs)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] == b[mid]:
            lo = mid + 1
        else:
            hi = mid
    return lo


def prefix_keys(tokens: Sequence[int]) -> List[Key]:
    """keys[m] identifies tokens[0..m] (inclusive)."""
    keys: List[Key] = []
    a = b = 0
    for token in tokens:
        a = hash((a, token))
        b = hash((token, b, _SALT))
        keys.append((a, b))
    return keys


class PromptScoreCache:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: "OrderedDict[Key, Tuple[int, TokenLogprob]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, keys: Sequence[Key], top_k: int) -> List[TokenLogprob]:
        """The leading scores of a prompt with these ``prefix_keys`` (entry i scores token i + 1)
        that are known with at least ``top_k`` alternatives, trimmed to ``top_k``."""
        found: List[TokenLogprob] = []
        for key in keys[1:]:
            held = self._entries.get(key)
            if held is None or held[0] < top_k:
                break
            self._entries.move_to_end(key)
            token, logprob, top = held[1]
            found.append((token, logprob, top[:top_k]))
        return found

    def insert(self, keys: Sequence[Key], first: int, entries: Sequence[TokenLogprob], top_k: int) -> None:
        """Keep ``entries``, the scores of prompt tokens first + 1 ... of the prompt with these keys."""
        for i, entry in enumerate(entries, start=first):
            key = keys[i + 1]
            held = self._entries.get(key)
            if held is not None and held[0] >= top_k:
                self._entries.move_to_end(key)
                continue
            self._entries[key] = (top_k, entry)
            self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def reset(self) -> None:
        self._entries.clear()
