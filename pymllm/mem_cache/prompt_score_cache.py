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
used, within ``max_bytes`` of host memory (estimated per entry from its alternatives). Entries are
held as tuples of numbers only, which the garbage collector stops tracking, so a full cache adds
nothing to a collection's pause (pymllm.orchestrator.gc_control).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence, Tuple

from pymllm.engine.io_struct import TokenLogprob

DEFAULT_MAX_BYTES = 64 << 20
# Estimated host bytes of one entry, from tracemalloc and sys.getsizeof on CPython 3.11: the dict's
# slot and value tuple (~130), the key (~120), the score's own tuple, float and alternatives' tuple
# (~180), and per alternative a tuple of an int and a float (~90). 64 MiB hold ~125k entries at one
# alternative.
_ENTRY_BYTES = 430
_ALTERNATIVE_BYTES = 90


def entry_bytes(top_k: int) -> int:
    return _ENTRY_BYTES + _ALTERNATIVE_BYTES * top_k


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
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < entry_bytes(0):
            raise ValueError(f"max_bytes must hold at least one entry ({entry_bytes(0)}), got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        # key -> (alternatives held, (token, logprob, ((alt token, alt logprob), ...)))
        self._entries: "OrderedDict[Key, Tuple[int, Tuple[int, float, Tuple[Tuple[int, float], ...]]]]" = OrderedDict()

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
            found.append((token, logprob, list(top[:top_k])))
        return found

    def insert(self, keys: Sequence[Key], first: int, entries: Sequence[TokenLogprob], top_k: int) -> None:
        """Keep ``entries``, the scores of prompt tokens first + 1 ... of the prompt with these keys."""
        size = entry_bytes(top_k)
        for key, (token, logprob, top) in zip(keys[first + 1:], entries):
            held = self._entries.get(key)
            if held is not None:
                self._entries.move_to_end(key)
                if held[0] >= top_k:
                    continue
                self.bytes -= entry_bytes(held[0])
            self._entries[key] = (top_k, (token, logprob, tuple(top)))  # a new key goes last
            self.bytes += size
        while self.bytes > self.max_bytes:
            _, (k, _) = self._entries.popitem(last=False)
            self.bytes -= entry_bytes(k)

    def reset(self) -> None:
        self._entries.clear()
        self.bytes = 0
