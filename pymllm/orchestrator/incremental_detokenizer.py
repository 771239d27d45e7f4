"""Turning a request's token ids into text chunk by chunk, and cutting it at stop strings.

Decoding token by token is wrong for two reasons: a byte-level token may hold half of a
UTF-8 character, and SentencePiece-style tokenizers drop a word's leading space when the
word is decoded alone. Decoding the whole output each step would be right but quadratic.
So each step decodes a short window: the ids whose text was already emitted last step
(context) plus the new ids, and emits only the text the new ids add to the context.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from pymllm.parsers.partial_match import partial_suffix_len

_REPLACEMENT_CHAR = "\ufffd"
# A UTF-8 character is at most 4 bytes, so an incomplete one spans at most 3 byte tokens.
_MAX_CHAR_TOKENS = 4
# Held ids past this many cannot be one incomplete character: they are invalid bytes, whose
# replacement chars are the real output.
_MAX_HELD_TOKENS = 8


class IncrementalDetokenizer:
    """Per-request incremental decoder.

    ``prompt_ids_tail``: the last few prompt ids, used only as decoding context so that the
    first generated word keeps its leading space. ``stop``: strings that end the output; the
    text returned never contains one, nor any partial one that might still complete.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids_tail: Optional[Sequence[int]] = None,
        skip_special_tokens: bool = True,
        stop: Optional[Sequence[str]] = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stops = [s for s in (stop or ()) if s]
        # Only the decoding window is kept: ids[:read_offset] is context already emitted.
        self._ids: List[int] = list(prompt_ids_tail or ())
        self._read_offset = len(self._ids)
        self._held_text = ""  # decoded text that may be the start of a stop string
        self.stopped = False
        self.matched: Optional[str] = None

    def add_tokens(self, ids: Sequence[int]) -> Tuple[str, bool, Optional[str]]:
        """Append generated ids; return (newly printable text, stopped, matched stop string).

        Once stopped, the request's text is complete and later calls return nothing.
        """
        if self.stopped:
            return "", True, self.matched
        self._ids.extend(ids)
        return self._cut_at_stop(self._decode_new(final=False), final=False)

    def finish(self) -> str:
        """The request ended: return whatever was held back (incomplete characters are
        decoded as replacement chars, a partial stop string is ordinary text)."""
        if self.stopped:
            return ""
        text, _, _ = self._cut_at_stop(self._decode_new(final=True), final=True)
        return text

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_new(self, final: bool) -> str:
        if len(self._ids) == self._read_offset:
            return ""
        end = len(self._ids)
        full = self._decode(self._ids)
        if not final and full.endswith(_REPLACEMENT_CHAR):
            end, full = self._complete_prefix(full)
            if end == self._read_offset:
                return ""  # every new id belongs to an incomplete character: wait for the rest
        context = self._decode(self._ids[: self._read_offset])
        if full.startswith(context):
            new_text = full[len(context):]
        else:
            # Rare: a tokenizer cleanup rule rewrote the context once more text followed it.
            new_text = full[_common_prefix_len(context, full):]
        # The emitted ids become the next step's context; older ids are no longer needed.
        self._ids = self._ids[self._read_offset:]
        self._read_offset = end - self._read_offset
        return new_text

    def _complete_prefix(self, full: str) -> Tuple[int, str]:
        """(end, text): the longest window ``ids[:end]`` whose text does not end inside a
        character, so the text before an incomplete character is not delayed with it."""
        end = len(self._ids)
        while end > self._read_offset and len(self._ids) - end < _MAX_CHAR_TOKENS:
            end -= 1
            text = self._decode(self._ids[:end])
            if not text.endswith(_REPLACEMENT_CHAR):
                return end, text
        if len(self._ids) - self._read_offset >= _MAX_HELD_TOKENS:
            # Held too long to be one incomplete character: the bytes are invalid, emit them.
            return len(self._ids), full
        return self._read_offset, ""

    def _cut_at_stop(self, text: str, final: bool) -> Tuple[str, bool, Optional[str]]:
        if not self._stops:
            return text, False, None
        buf = self._held_text + text
        self._held_text = ""
        hit = _first_stop(buf, self._stops)
        if hit is not None:
            start, matched = hit
            self.stopped = True
            self.matched = matched
            return buf[:start], True, matched
        if final:
            return buf, False, None
        held = partial_suffix_len(buf, self._stops)
        self._held_text = buf[len(buf) - held:]
        return buf[: len(buf) - held], False, None


def _first_stop(text: str, stops: Sequence[str]) -> Optional[Tuple[int, str]]:
    """(start, stop) of the stop string whose match ends first in ``text``.

    Ordering by end position makes the result independent of how the text was chunked: a
    stream sees the earliest-ending match first. Ties go to the longer (earlier) match.
    """
    best: Optional[Tuple[int, int, str]] = None  # (end, start, stop)
    for stop in stops:
        start = text.find(stop)
        if start < 0:
            continue
        candidate = (start + len(stop), start, stop)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    return None if best is None else (best[1], best[2])


def _common_prefix_len(a: str, b: str) -> int:
    size = min(len(a), len(b))
    for i in range(size):
        if a[i] != b[i]:
            return i
    return size
