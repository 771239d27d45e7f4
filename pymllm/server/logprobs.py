"""Engine logprobs -> the two OpenAI shapes (chat ``content[]`` and legacy completions)."""

from __future__ import annotations

import codecs
import math
from typing import List, Optional, Sequence, Tuple

from pymllm.orchestrator.token_bytes import token_name_bytes
from pymllm.server.protocol import ChatChoiceLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

# Engine entry per token: (token text, logprob, [(top token text, top logprob), ...]); the
# logprob of an echoed prompt's first token is None.
EngineLogprob = Tuple[str, Optional[float], List[Tuple[str, float]]]

# JSON has no -inf; OpenAI reports impossible tokens with this floor.
_LOGPROB_FLOOR = -9999.0


def finite_logprob(logprob: float) -> float:
    if math.isnan(logprob) or logprob < _LOGPROB_FLOOR:
        return _LOGPROB_FLOOR
    return float(logprob)


def _utf8(token: str) -> List[int]:
    return list(token_name_bytes(token))


class TextOffsets:
    """Where each token of a choice's text starts (legacy ``text_offset``), in characters. A
    token ending inside a UTF-8 character (named ``bytes:\\x..``) moves the offset only by the
    characters it completes, so the offsets index the text the client receives."""

    def __init__(self, start: int = 0) -> None:
        self.offset = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = False  # the decoder holds the first bytes of a character

    def place(self, token: str) -> int:
        """The offset of ``token``, the next token of the text; moves past it."""
        at = self.offset
        if self._pending or token.startswith("bytes:"):
            self.offset += len(self._decoder.decode(token_name_bytes(token)))
            self._pending = bool(self._decoder.getstate()[0])
        else:  # whole characters after whole characters: the text is the name (2.5x faster)
            self.offset += len(token)
        return at


def chat_logprobs(entries: Optional[Sequence[EngineLogprob]], top_k: int) -> Optional[ChatChoiceLogprobs]:
    if not entries:
        return None
    content = [
        ChatTokenLogprob(
            token=token,
            logprob=finite_logprob(logprob),
            bytes=_utf8(token),
            top_logprobs=[
                TopLogprob(token=t, logprob=finite_logprob(lp), bytes=_utf8(t)) for t, lp in top[:top_k]
            ],
        )
        for token, logprob, top in entries
    ]
    return ChatChoiceLogprobs(content=content)


def completion_logprobs(
    entries: Optional[Sequence[EngineLogprob]], top_k: int, offsets: TextOffsets
) -> Optional[CompletionLogprobs]:
    """Legacy shape; ``offsets`` places the tokens in the choice's text (and moves on, for the
    next stream chunk)."""
    if not entries:
        return None
    out = CompletionLogprobs()
    for token, logprob, top in entries:
        out.tokens.append(token)
        out.text_offset.append(offsets.place(token))
        if logprob is None:  # an echoed prompt's first token: nothing comes before it
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(finite_logprob(logprob))
        # OpenAI always lists the sampled token among the alternatives.
        alternatives = {t: finite_logprob(lp) for t, lp in top[:top_k]}
        alternatives.setdefault(token, finite_logprob(logprob))
        out.top_logprobs.append(alternatives)
    return out


def joined_completion_logprobs(parts: Sequence[Optional[CompletionLogprobs]]) -> Optional[CompletionLogprobs]:
    """One legacy logprobs object of consecutive parts (an echoed prompt's, then the output's)."""
    present = [part for part in parts if part is not None]
    if not present:
        return None
    out = CompletionLogprobs()
    for part in present:
        out.tokens.extend(part.tokens)
        out.token_logprobs.extend(part.token_logprobs)
        out.top_logprobs.extend(part.top_logprobs)
        out.text_offset.extend(part.text_offset)
    return out
