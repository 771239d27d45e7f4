"""Output parsers that turn raw model text into OpenAI fields (reasoning_content, tool_calls)."""

from pymllm.parsers.reasoning import REASONING_PARSERS, ReasoningParser, get_reasoning_parser
from pymllm.parsers.tool_call import TOOL_CALL_PARSERS, HermesToolCallParser, get_tool_call_parser

__all__ = [
    "REASONING_PARSERS",
    "TOOL_CALL_PARSERS",
    "HermesToolCallParser",
    "ReasoningParser",
    "get_reasoning_parser",
    "get_tool_call_parser",
]
