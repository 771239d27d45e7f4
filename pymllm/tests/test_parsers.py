"""Reasoning and tool-call parsers, whole and streamed (every chunking must agree)."""

from __future__ import annotations

import json

import pytest

from pymllm.parsers.reasoning import (
    Qwen3ReasoningParser,
    ReasoningDelta,
    get_reasoning_parser,
    template_opens_reasoning,
)
from pymllm.parsers.tool_call import HermesToolCallParser, ToolCallChunk, get_tool_call_parser
from pymllm.server.testing import ByteTokenizer


def _chunkings(text):
    yield [text]
    yield list(text)
    yield [text[i:i + 3] for i in range(0, len(text), 3)]
    yield [text[i:i + 7] for i in range(0, len(text), 7)]


def _stream_reasoning(chunks, reasoning_open=False):
    parser = Qwen3ReasoningParser(reasoning_open)
    total = ReasoningDelta()
    deltas = []
    for chunk in chunks:
        delta = parser.feed(chunk)
        deltas.append(delta)
        total = total + delta
    tail = parser.flush()
    deltas.append(tail)
    return total + tail, deltas


REASONING_CASES = [
    # (model output, reasoning_open, expected reasoning, expected content)
    ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", False, "Let me think.", "The answer is 4."),
    ("Let me think.\n</think>\n\nThe answer is 4.", True, "Let me think.", "The answer is 4."),
    ("<think>\nreopened\n</think>\n\nok", True, "reopened", "ok"),
    ("The answer is 4.", False, None, "The answer is 4."),
    ("</think>\n\nquick", True, "", "quick"),
    ("<think>\nstill thinking when cut off", False, "still thinking when cut off", ""),
    ("x < y and <b>bold</b>", False, None, "x < y and <b>bold</b>"),
    ("<think>a</think>b</think>c", False, "a", "b</think>c"),
]


@pytest.mark.parametrize("text,reasoning_open,reasoning,content", REASONING_CASES)
def test_reasoning_split_whole_and_streamed(text, reasoning_open, reasoning, content):
    assert Qwen3ReasoningParser(reasoning_open).split(text) == (reasoning, content)
    for chunks in _chunkings(text):
        total, deltas = _stream_reasoning(chunks, reasoning_open)
        assert total.reasoning == (reasoning or "")
        assert total.content == content
        for delta in deltas:  # no tag, nor a piece of one, is ever emitted
            assert "<" not in delta.reasoning
            if "<" not in content:
                assert "<" not in delta.content


def test_reasoning_tags_split_across_chunks_never_leak():
    chunks = ["<th", "ink>", "abc</", "th", "ink", ">", "\n\nanswer"]
    parser = Qwen3ReasoningParser()
    emitted = [parser.feed(c) for c in chunks] + [parser.flush()]
    assert [d.reasoning for d in emitted if d.reasoning] == ["abc"]
    assert "".join(d.content for d in emitted) == "answer"
    assert all("<" not in d.reasoning + d.content for d in emitted)


def test_reasoning_is_streamed_before_the_end_tag():
    parser = Qwen3ReasoningParser()
    assert parser.feed("<think>step one").reasoning == "step one"
    assert parser.feed(" and two").reasoning == " and two"
    assert parser.feed("</think>done").content == "done"


def test_registry_and_template_probe():
    assert get_reasoning_parser("qwen3") is Qwen3ReasoningParser
    with pytest.raises(ValueError):
        get_reasoning_parser("nope")
    assert template_opens_reasoning(ByteTokenizer(think_prompt=True), Qwen3ReasoningParser, None)
    assert not template_opens_reasoning(
        ByteTokenizer(think_prompt=True), Qwen3ReasoningParser, {"enable_thinking": False}
    )
    assert not template_opens_reasoning(ByteTokenizer(), Qwen3ReasoningParser, None)
    assert not template_opens_reasoning(object(), Qwen3ReasoningParser, None)


# ---------------------------------------------------------------- tool calls

CALL_1 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n</tool_call>'
CALL_2 = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


def _stream_tools(chunks):
    parser = HermesToolCallParser()
    total = ToolCallChunk()
    pieces = []
    for chunk in chunks:
        out = parser.feed(chunk)
        pieces.append(out)
        total = total + out
    tail = parser.flush()
    pieces.append(tail)
    return total + tail, pieces, parser


def _calls_from_deltas(deltas):
    calls = {}
    for d in deltas:
        entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
        if d.id:
            entry["id"], entry["name"] = d.id, d.name
        entry["arguments"] += d.arguments or ""
    return [calls[i] for i in sorted(calls)]


def test_tool_calls_whole():
    content, calls = HermesToolCallParser().parse("I'll check.\n" + CALL_1 + "\n" + CALL_2)
    assert content == "I'll check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "°C"}
    assert calls[1].arguments == "{}"
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id


def test_only_tool_calls_gives_null_content():
    content, calls = HermesToolCallParser().parse(CALL_1)
    assert content is None and len(calls) == 1


def test_plain_text_without_calls_is_unchanged():
    assert HermesToolCallParser().parse("  just text <b>x</b>  ") == ("  just text <b>x</b>  ", [])


def test_malformed_call_stays_text():
    text = "before <tool_call>\n{not json}\n</tool_call> after"
    assert HermesToolCallParser().parse(text) == (text, [])


def test_unclosed_call_with_complete_json_counts():
    content, calls = HermesToolCallParser().parse('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n')
    assert content is None and calls[0].name == "f" and json.loads(calls[0].arguments) == {"a": 1}


def test_unclosed_call_with_truncated_json_is_text():
    text = '<tool_call>\n{"name": "f", "argu'
    assert HermesToolCallParser().parse(text) == (text, [])


def test_arguments_given_as_string_or_parameters():
    parser = get_tool_call_parser("qwen")
    _, calls = parser().parse('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert calls[0].arguments == '{"x": 1}'
    _, calls = parser().parse('<tool_call>{"name": "g", "parameters": {"y": 2}}</tool_call>')
    assert json.loads(calls[0].arguments) == {"y": 2}


@pytest.mark.parametrize("text", ["Let me look.\n" + CALL_1 + "\n" + CALL_2, CALL_1, "no calls < here <tool"])
def test_tool_call_streaming_matches_whole(text):
    whole_content, whole_calls = HermesToolCallParser().parse(text)
    for chunks in _chunkings(text):
        total, pieces, parser = _stream_tools(chunks)
        streamed = _calls_from_deltas(total.deltas)
        assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == [
            (c.name, json.loads(c.arguments)) for c in whole_calls
        ]
        assert [c["id"] for c in streamed] == [c.id for c in parser.calls]
        if whole_calls:
            assert total.content.strip() == (whole_content or "")
        else:
            assert total.content == whole_content
        for piece in pieces:
            assert "<tool_call" not in piece.content and "<tool_c" not in piece.content


def test_streamed_call_header_comes_before_arguments():
    _, pieces, _ = _stream_tools(list(CALL_1))
    deltas = [d for p in pieces for d in p.deltas]
    assert deltas[0].id and deltas[0].name == "get_weather" and deltas[0].arguments == ""
    assert deltas[1].id is None and json.loads(deltas[1].arguments)["city"] == "Paris"


def test_text_that_only_looks_like_a_tag_start_is_released():
    parser = HermesToolCallParser()
    assert parser.feed("a <tool").content == "a "
    assert parser.feed("box> b").content == "<toolbox> b"
