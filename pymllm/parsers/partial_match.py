"""Finding text that may be the start of a marker which has not fully arrived yet."""

from __future__ import annotations

from typing import Iterable


def partial_suffix_len(text: str, markers: Iterable[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``markers``.

    Streaming parsers hold back that many characters: the next chunk decides whether they
    complete a marker (a tag, a stop string) or are ordinary text.
    """
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best
