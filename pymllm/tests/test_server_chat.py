"""/v1/chat/completions against a scripted engine: shapes, SSE, n, logprobs, stop, parsers."""

from __future__ import annotations

import json

import pytest

from pymllm.configs.server_config import ServerConfig
from pymllm.server import create_app
from pymllm.server.testing import ByteTokenizer, FakeEngineClient, ScriptedReply, asgi_client, parse_sse

pytestmark = pytest.mark.anyio

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def _post(fake, body, path="/v1/chat/completions", **config):
    app = create_app(fake, ServerConfig(**config))
    async with asgi_client(app) as client:
        return await client.post(path, json=body)


async def test_non_streaming_reply_shape_and_usage():
    fake = FakeEngineClient(ScriptedReply(chunks=["Hel", "lo ", "é", "你好", "😀"], finish="length"))
    r = await _post(fake, {"model": "fake-model", "messages": USER, "max_tokens": 5, "temperature": 0.5})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-model"
    choice = body["choices"][0]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "Hello é你好😀"},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert body["usage"] == {
        "prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    req = fake.requests[0]
    assert req.messages == USER and req.rid == body["id"]
    assert req.sampling_params == {
        "max_new_tokens": 5, "temperature": 0.5, "ignore_eos": False, "skip_special_tokens": True,
    }


async def test_max_completion_tokens_wins_and_sampling_fields_pass_through():
    fake = FakeEngineClient()
    body = {
        "messages": USER, "max_tokens": 5, "max_completion_tokens": 9, "top_p": 0.9, "top_k": 20,
        "min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1,
        "seed": 42, "stop": "END", "stop_token_ids": [7], "ignore_eos": True, "skip_special_tokens": False,
    }
    assert (await _post(fake, body)).status_code == 200
    params = fake.requests[0].sampling_params
    assert params["max_new_tokens"] == 9 and params["stop"] == ["END"] and params["seed"] == 42
    assert params["top_k"] == 20 and params["stop_token_ids"] == [7] and params["ignore_eos"] is True
    assert params["skip_special_tokens"] is False and params["repetition_penalty"] == 1.1


async def test_streaming_sse_format_and_usage_chunk():
    fake = FakeEngineClient(ScriptedReply(chunks=["Hel", "lo", " 😀"]))
    body = {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    r = await _post(fake, body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello 😀"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "stop"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
    assert all("usage" not in c for c in chunks[:-1])


async def test_streaming_without_include_usage_has_no_usage_chunk():
    r = await _post(FakeEngineClient(), {"messages": USER, "stream": True})
    events = parse_sse(r.text)
    assert all(e == "[DONE]" or e["choices"] for e in events)


async def test_n_choices_with_seeds_non_streaming():
    fake = FakeEngineClient(lambda req: ScriptedReply(chunks=[f"choice {req.rid[-1]}"]))
    r = await _post(fake, {"messages": USER, "n": 3, "seed": 10})
    body = r.json()
    rid = body["id"]
    assert [q.rid for q in fake.requests] == [f"{rid}-0", f"{rid}-1", f"{rid}-2"]
    assert [q.sampling_params["seed"] for q in fake.requests] == [10, 11, 12]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in body["choices"]] == ["choice 0", "choice 1", "choice 2"]
    assert body["usage"]["prompt_tokens"] == 7 and body["usage"]["completion_tokens"] == 3


async def test_n_choices_streaming_interleaves_by_index():
    fake = FakeEngineClient(lambda req: ScriptedReply(chunks=["a", "b", "c"], delay_s=0.001))
    r = await _post(fake, {"messages": USER, "n": 2, "stream": True, "stream_options": {"include_usage": True}})
    chunks = [e for e in parse_sse(r.text) if e != "[DONE]"]
    per_index = {0: "", 1: ""}
    finishes = {}
    for c in chunks:
        for choice in c["choices"]:
            per_index[choice["index"]] += choice["delta"].get("content", "")
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert per_index == {0: "abc", 1: "abc"} and finishes == {0: "stop", 1: "stop"}
    assert chunks[-1]["usage"]["completion_tokens"] == 6 and chunks[-1]["usage"]["prompt_tokens"] == 7


async def test_logprobs_shapes():
    fake = FakeEngineClient(ScriptedReply(chunks=["é", "b"]))
    r = await _post(fake, {"messages": USER, "logprobs": True, "top_logprobs": 2})
    assert fake.requests[0].sampling_params["logprobs"] is True
    assert fake.requests[0].sampling_params["top_logprobs"] == 2
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content[0] == {
        "token": "é", "logprob": -0.25, "bytes": [0xC3, 0xA9],
        "top_logprobs": [
            {"token": "é", "logprob": -0.25, "bytes": [0xC3, 0xA9]},
            {"token": "alt", "logprob": -1.5, "bytes": [97, 108, 116]},
        ],
    }
    r = await _post(fake, {"messages": USER, "logprobs": True, "stream": True})
    chunks = [e for e in parse_sse(r.text) if e != "[DONE]"]
    with_lp = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert [lp["content"][0]["token"] for lp in with_lp] == ["é", "b"]
    assert all(lp["content"][0]["top_logprobs"] == [] for lp in with_lp)


async def test_stop_string_trimmed_through_the_detokenizer():
    tok = ByteTokenizer()
    ids = tok.encode("Answer: 你好!<|stop|> never shown")
    fake = FakeEngineClient(ScriptedReply(token_ids=ids), tokenizer=tok)
    r = await _post(fake, {"messages": USER, "stop": ["<|stop|>"]})
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "Answer: 你好!" and choice["finish_reason"] == "stop"
    r = await _post(fake, {"messages": USER, "stop": ["<|stop|>"], "stream": True})
    deltas = [c["choices"][0]["delta"].get("content", "") for c in parse_sse(r.text)[:-1]]
    assert "".join(deltas) == "Answer: 你好!"
    assert all("<" not in d and "\ufffd" not in d for d in deltas)


async def test_message_normalisation():
    fake = FakeEngineClient()
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what is "}, {"type": "text", "text": "this?"}]},
        {"role": "user", "content": [
            {"type": "text", "text": "and this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}},
        ]},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    assert (await _post(fake, {"messages": messages})).status_code == 200
    assert fake.requests[0].messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is this?"},
        {"role": "user", "content": [
            {"type": "text", "text": "and this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}},
        ]},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]


async def test_chat_template_kwargs_pass_through():
    fake = FakeEngineClient()
    body = {"messages": USER, "chat_template_kwargs": {"enable_thinking": False}}
    await _post(fake, body)
    assert fake.requests[0].chat_template_kwargs == {"enable_thinking": False}


async def test_abort_finish_reason():
    r = await _post(FakeEngineClient(ScriptedReply(chunks=["x"], finish="abort")), {"messages": USER})
    assert r.json()["choices"][0]["finish_reason"] == "abort"


# ---------------------------------------------------------------- reasoning and tool calls

THINKING = ["<th", "ink>\nI should", " greet.\n</th", "ink>\n\nHel", "lo!"]


async def test_reasoning_split_non_streaming():
    fake = FakeEngineClient(ScriptedReply(chunks=THINKING))
    r = await _post(fake, {"messages": USER}, reasoning_parser="qwen3")
    message = r.json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Hello!", "reasoning_content": "I should greet."}


async def test_reasoning_split_streaming_with_tags_across_chunks():
    fake = FakeEngineClient(ScriptedReply(chunks=THINKING))
    r = await _post(fake, {"messages": USER, "stream": True}, reasoning_parser="qwen3")
    deltas = [c["choices"][0]["delta"] for c in parse_sse(r.text)[:-1]]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    assert reasoning == "I should greet." and content == "Hello!"
    assert not any("<" in d.get("reasoning_content", "") + d.get("content", "") for d in deltas)


async def test_reasoning_when_the_template_opened_think():
    tok = ByteTokenizer(think_prompt=True)
    fake = FakeEngineClient(ScriptedReply(chunks=["Thinking...", "</think>", "\n\nDone."]), tokenizer=tok)
    r = await _post(fake, {"messages": USER}, reasoning_parser="qwen3")
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"] == "Thinking..." and message["content"] == "Done."
    # enable_thinking False: the template closes the block itself, the reply is all content.
    fake = FakeEngineClient(ScriptedReply(chunks=["Just ", "text."]), tokenizer=tok)
    body = {"messages": USER, "chat_template_kwargs": {"enable_thinking": False}}
    message = (await _post(fake, body, reasoning_parser="qwen3")).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Just text."}


async def test_without_reasoning_parser_tags_stay_in_content():
    r = await _post(FakeEngineClient(ScriptedReply(chunks=THINKING)), {"messages": USER})
    assert r.json()["choices"][0]["message"]["content"].startswith("<think>")


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}}]
CALL_CHUNKS = [
    "Checking.\n", "<tool_", "call>\n{\"name\": \"get_weather\", ", "\"arguments\": {\"city\": \"Zürich\"}}",
    "\n</tool_call>",
]


@pytest.mark.parametrize("tool_choice", [None, {"type": "function", "function": {"name": "get_weather"}}])
async def test_tool_calls_non_streaming(tool_choice):
    fake = FakeEngineClient(ScriptedReply(chunks=CALL_CHUNKS))
    r = await _post(fake, {"messages": USER, "tools": TOOLS, "tool_choice": tool_choice})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Zürich"}
    assert fake.requests[0].tools == TOOLS


async def test_tool_calls_streaming():
    fake = FakeEngineClient(ScriptedReply(chunks=CALL_CHUNKS))
    r = await _post(fake, {"messages": USER, "tools": TOOLS, "stream": True})
    choices = [c["choices"][0] for c in parse_sse(r.text)[:-1]]
    content = "".join(c["delta"].get("content", "") for c in choices)
    calls = [tc for c in choices for tc in c["delta"].get("tool_calls", [])]
    assert content.strip() == "Checking." and "<" not in content
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert all(tc["index"] == 0 for tc in calls)
    arguments = "".join(tc["function"].get("arguments", "") for tc in calls)
    assert json.loads(arguments) == {"city": "Zürich"}
    assert choices[-1]["finish_reason"] == "tool_calls"


async def test_tool_choice_none_leaves_text_and_hides_tools():
    fake = FakeEngineClient(ScriptedReply(chunks=CALL_CHUNKS))
    r = await _post(fake, {"messages": USER, "tools": TOOLS, "tool_choice": "none"})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert "<tool_call>" in choice["message"]["content"]
    assert fake.requests[0].tools is None


def _format(req) -> dict:
    return json.loads(req.sampling_params["structural_tag"])["format"]


async def test_a_forced_tool_call_is_decoded_under_its_grammar():
    clock = {"type": "function", "function": {"name": "get_time"}}  # no parameters: any object
    fake = FakeEngineClient(ScriptedReply(chunks=CALL_CHUNKS))
    choice = {"type": "function", "function": {"name": "get_weather"}}
    await _post(fake, {"messages": USER, "tools": [clock] + TOOLS, "tool_choice": choice})
    await _post(fake, {"messages": USER, "tools": [clock] + TOOLS, "tool_choice": "required"})
    await _post(fake, {"messages": USER, "tools": [clock] + TOOLS, "tool_choice": "required",
                       "parallel_tool_calls": False})
    await _post(fake, {"messages": USER, "tools": [clock] + TOOLS, "tool_choice": "auto"})
    named, required, single, auto = fake.requests
    # A named function: the model sees only it, and the reply is calls of it in the parser's layout.
    assert named.tools == TOOLS and required.tools == [clock] + TOOLS == auto.tools
    weather = {"type": "tag", "begin": '<tool_call>\n{"name": "get_weather", "arguments": ',
               "content": {"type": "json_schema", "json_schema": TOOLS[0]["function"]["parameters"],
                           "max_whitespace_cnt": 1},
               "end": "}\n</tool_call>"}
    time_call = {**weather, "begin": '<tool_call>\n{"name": "get_time", "arguments": ',
                 "content": {**weather["content"], "json_schema": {"type": "object"}}}
    assert _format(named) == {"type": "tags_with_separator", "tags": [weather], "separator": "\n",
                              "at_least_one": True, "stop_after_first": False}
    assert _format(required)["tags"] == [time_call, weather] and not _format(required)["stop_after_first"]
    assert _format(single)["stop_after_first"]  # parallel_tool_calls false: one call
    assert "structural_tag" not in auto.sampling_params and "json_schema" not in auto.sampling_params
    # Where the template opens a reasoning block, the constrained reply closes it first.
    opened = FakeEngineClient(ScriptedReply(chunks=CALL_CHUNKS), tokenizer=ByteTokenizer(think_prompt=True))
    await _post(opened, {"messages": USER, "tools": TOOLS, "tool_choice": "required"}, reasoning_parser="qwen3")
    await _post(opened, {"messages": USER, "response_format": {"type": "json_object"}}, reasoning_parser="qwen3")
    for req in opened.requests:
        first, _ = _format(req)["elements"]
        assert first == {"type": "const_string", "value": "</think>\n\n"}
        assert "json_schema" not in req.sampling_params
    # A tool whose parameters cannot constrain a reply is named in the 400.
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}]
    r = await _post(fake, {"messages": USER, "tools": bad, "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the parameters of tool 'f': ")
    assert r.json()["error"]["param"] == "tools"
    # Both cannot constrain one reply.
    r = await _post(fake, {"messages": USER, "tools": TOOLS, "tool_choice": "required",
                           "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and "tool_choice makes a tool call" in r.json()["error"]["message"]


async def test_constraints_close_an_open_reasoning_block_first():
    """regex, ebnf and structured_outputs where the template opens <think>: the reply closes the block,
    then follows the constraint (as response_format does above)."""
    opened = FakeEngineClient(tokenizer=ByteTokenizer(think_prompt=True))
    for body in ({"regex": "[0-9]+"}, {"ebnf": 'root ::= "a"'}, {"structured_outputs": {"choice": ["x", "y"]}},
                 {"structured_outputs": {"json": {"type": "object"}}}):
        r = await _post(opened, {"messages": USER, **body}, reasoning_parser="qwen3")
        assert r.status_code == 200, r.text
    formats = [_format(req)["elements"] for req in opened.requests]
    assert all(first == {"type": "const_string", "value": "</think>\n\n"} for first, _ in formats)
    assert [second for _, second in formats] == [
        {"type": "regex", "pattern": "[0-9]+"}, {"type": "grammar", "grammar": 'root ::= "a"'},
        {"type": "grammar", "grammar": 'root ::= "x" | "y"'},
        {"type": "json_schema", "json_schema": {"type": "object"}, "max_whitespace_cnt": 1}]
    assert all(set(req.sampling_params) & {"regex", "ebnf", "json_schema"} == set() for req in opened.requests)
    r = await _post(opened, {"messages": USER, "regex": "(bad"}, reasoning_parser="qwen3")
    assert r.status_code == 400 and r.json()["error"]["param"] == "regex"
    assert r.json()["error"]["message"].startswith("regex: regex cannot be followed")
    r = await _post(opened, {"messages": USER, "structured_outputs": {"json": "{nope"}}, reasoning_parser="qwen3")
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs"
    assert "json_schema is not valid JSON" in r.json()["error"]["message"]


async def test_reasoning_then_tool_call():
    chunks = ["<think>\nneed weather\n</think>\n\n"] + CALL_CHUNKS[1:]
    r = await _post(FakeEngineClient(ScriptedReply(chunks=chunks)), {"messages": USER, "tools": TOOLS},
                    reasoning_parser="qwen3")
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"] == "need weather" and message["content"] is None
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
