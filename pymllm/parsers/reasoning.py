"""Splitting ``<think>...</think>`` reasoning from the answer, whole or chunk by chunk.

One state machine serves both modes: ``split`` feeds the whole text at once, so a streamed
reply and a non-streamed one always split the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Type

from pymllm.parsers.partial_match import partial_suffix_len

_START, _REASONING, _CONTENT = "start", "reasoning", "content"


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""

    def __add__(self, other: "ReasoningDelta") -> "ReasoningDelta":
        return ReasoningDelta(self.reasoning + other.reasoning, self.content + other.content)


class ReasoningParser:
    """Incremental parser for one reply whose reasoning is wrapped in start/end tags.

    ``reasoning_open``: the chat template already emitted the start tag at the end of the
    prompt (Qwen3 thinking templates), so the reply begins inside the reasoning and only
    the end tag appears in it.
    """

    start_tag = "<think>"
    end_tag = "</think>"

    def __init__(self, reasoning_open: bool = False) -> None:
        self._reasoning_open = reasoning_open
        self._state = _START
        self._buf = ""
        # Whitespace right after a tag is layout, not reasoning or answer text.
        self._strip_leading = False
        self.saw_reasoning = False

    def feed(self, text: str) -> ReasoningDelta:
        """Consume a chunk; return the reasoning and content that are now certain."""
        self._buf += text
        out = ReasoningDelta()
        while True:
            if self._state == _START and not self._decide_start():
                return out
            if self._state == _REASONING:
                reasoning, done = self._take_reasoning()
                out.reasoning += reasoning
                if not done:
                    return out
            if self._state == _CONTENT:
                out.content += self._take_content()
                return out

    def flush(self) -> ReasoningDelta:
        """The reply ended: release everything held back (a truncated tag is plain text)."""
        buf, self._buf = self._buf, ""
        if self._state == _START:
            if self._reasoning_open:
                self.saw_reasoning = True
                return ReasoningDelta(reasoning=buf.strip())
            return ReasoningDelta(content=buf)
        if self._state == _REASONING:
            return ReasoningDelta(reasoning=buf.strip() if self._strip_leading else buf.rstrip())
        return ReasoningDelta(content=buf.lstrip() if self._strip_leading else buf)

    def split(self, text: str) -> Tuple[Optional[str], str]:
        """Non-streaming: (reasoning_content or None when the reply had none, content)."""
        total = self.feed(text) + self.flush()
        return (total.reasoning if self.saw_reasoning else None), total.content

    def _decide_start(self) -> bool:
        """Before any output is certain: does the reply open with the start tag?"""
        stripped = self._buf.lstrip()
        if not stripped or (self.start_tag.startswith(stripped) and stripped != self.start_tag):
            return False  # only whitespace or a partial start tag so far
        if stripped.startswith(self.start_tag):
            self._buf = stripped[len(self.start_tag):]
            self._enter_reasoning()
        elif self._reasoning_open:
            self._buf = stripped
            self._enter_reasoning()
        else:
            self._state = _CONTENT
        return True

    def _enter_reasoning(self) -> None:
        self._state = _REASONING
        self._strip_leading = True
        self.saw_reasoning = True

    def _take_reasoning(self) -> Tuple[str, bool]:
        """Reasoning text that is certain; True once the end tag was consumed."""
        if self._strip_leading:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return "", False
            self._strip_leading = False
        end = self._buf.find(self.end_tag)
        if end >= 0:
            reasoning = self._buf[:end].rstrip()
            self._buf = self._buf[end + len(self.end_tag):]
            self._state = _CONTENT
            self._strip_leading = True
            return reasoning, True
        held = partial_suffix_len(self._buf, (self.end_tag,))
        # Trailing whitespace is held too: if the end tag follows, it is dropped with it.
        certain = self._buf[: len(self._buf) - held].rstrip()
        self._buf = self._buf[len(certain):]
        return certain, False

    def _take_content(self) -> str:
        if self._strip_leading:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return ""
            self._strip_leading = False
        content, self._buf = self._buf, ""
        return content


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3 (and QwQ / DeepSeek-R1 style) ``<think>`` blocks."""


REASONING_PARSERS: Dict[str, Type[ReasoningParser]] = {"qwen3": Qwen3ReasoningParser}


def get_reasoning_parser(name: str) -> Type[ReasoningParser]:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        known = ", ".join(sorted(REASONING_PARSERS))
        raise ValueError(f"unknown reasoning parser {name!r}; known: {known}") from None


def template_opens_reasoning(
    tokenizer: Any, parser: Type[ReasoningParser], chat_template_kwargs: Optional[Dict[str, Any]]
) -> bool:
    """Whether the chat template's generation prompt ends inside an open reasoning block.

    The prompt is rendered in the tokenizer process, so the HTTP process renders a one-message
    probe with the same kwargs to learn whether replies start inside ``<think>``.
    """
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "ping"}],
            add_generation_prompt=True,
            tokenize=False,
            **(chat_template_kwargs or {}),
        )
    except Exception:  # no template, or one that rejects the probe: assume no open block
        return False
    return isinstance(rendered, str) and rendered.rstrip().endswith(parser.start_tag)
