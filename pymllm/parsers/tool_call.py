"""Hermes / Qwen style tool calls: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.

Streaming and non-streaming share one state machine (``parse`` feeds the whole text), so both
modes extract the same calls. A call is emitted once its closing tag arrives; a block whose
JSON is malformed is given back as plain text rather than dropped.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Type

from pymllm.parsers.partial_match import partial_suffix_len


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON document, as OpenAI sends it


@dataclass
class ToolCallDelta:
    """One OpenAI ``delta.tool_calls[]`` item: the header (id, name) and then the arguments."""

    index: int
    id: Optional[str] = None
    name: Optional[str] = None
    arguments: Optional[str] = None


@dataclass
class ToolCallChunk:
    content: str = ""
    deltas: List[ToolCallDelta] = field(default_factory=list)

    def __add__(self, other: "ToolCallChunk") -> "ToolCallChunk":
        return ToolCallChunk(self.content + other.content, self.deltas + other.deltas)


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class HermesToolCallParser:
    start_tag = "<tool_call>"
    end_tag = "</tool_call>"

    def __init__(self) -> None:
        self._buf = ""
        self._in_call = False
        # Whitespace between calls is layout; it is only emitted if real text follows it.
        self._pending_space = ""
        self.calls: List[ToolCall] = []

    def feed(self, text: str) -> ToolCallChunk:
        """Consume a chunk; return the content and tool-call deltas that are now certain."""
        self._buf += text
        out = ToolCallChunk()
        while True:
            if not self._in_call:
                start = self._buf.find(self.start_tag)
                if start < 0:
                    held = partial_suffix_len(self._buf, (self.start_tag,))
                    out.content += self._content(self._buf[: len(self._buf) - held])
                    self._buf = self._buf[len(self._buf) - held:]
                    return out
                out.content += self._content(self._buf[:start])
                self._buf = self._buf[start + len(self.start_tag):]
                self._in_call = True
            end = self._buf.find(self.end_tag)
            if end < 0:
                return out
            body = self._buf[:end]
            self._buf = self._buf[end + len(self.end_tag):]
            self._in_call = False
            out += self._finish_call(body, self.start_tag + body + self.end_tag)

    def flush(self) -> ToolCallChunk:
        """The reply ended. An unclosed call still counts if its JSON is complete (the model
        may stop right after it); anything else held back is plain text."""
        buf, self._buf = self._buf, ""
        out = ToolCallChunk()
        if self._in_call:
            self._in_call = False
            out = self._finish_call(buf, self.start_tag + buf)
        else:
            out.content = self._content(buf)
        if not self.calls:
            out.content += self._pending_space
        self._pending_space = ""
        return out

    def parse(self, text: str) -> Tuple[Optional[str], List[ToolCall]]:
        """Non-streaming: (content without the calls, or None when nothing is left; calls)."""
        total = self.feed(text) + self.flush()
        if not self.calls:
            return total.content, []
        return total.content.strip() or None, list(self.calls)

    def _content(self, text: str) -> str:
        if not text:
            return ""
        text = self._pending_space + text
        if text.isspace():
            self._pending_space = text
            return ""
        self._pending_space = ""
        return text

    def _finish_call(self, body: str, raw: str) -> ToolCallChunk:
        call = _parse_call_body(body)
        if call is None:
            return ToolCallChunk(content=self._content(raw))
        name, arguments = call
        index = len(self.calls)
        call_id = new_tool_call_id()
        self.calls.append(ToolCall(call_id, name, arguments))
        self._pending_space = ""
        return ToolCallChunk(
            deltas=[
                ToolCallDelta(index=index, id=call_id, name=name, arguments=""),
                ToolCallDelta(index=index, arguments=arguments),
            ]
        )


def _parse_call_body(body: str) -> Optional[Tuple[str, str]]:
    """(name, arguments JSON) of a well-formed call body, else None."""
    try:
        obj = json.loads(body.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    # Some fine-tunes spell the key "parameters"; both mean the function's arguments.
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        return obj["name"], arguments
    return obj["name"], json.dumps(arguments, ensure_ascii=False)


TOOL_CALL_PARSERS: Dict[str, Type[HermesToolCallParser]] = {
    "hermes": HermesToolCallParser,
    "qwen": HermesToolCallParser,
}
DEFAULT_TOOL_CALL_PARSER = "hermes"


def get_tool_call_parser(name: str) -> Type[HermesToolCallParser]:
    try:
        return TOOL_CALL_PARSERS[name]
    except KeyError:
        known = ", ".join(sorted(TOOL_CALL_PARSERS))
        raise ValueError(f"unknown tool-call parser {name!r}; known: {known}") from None
