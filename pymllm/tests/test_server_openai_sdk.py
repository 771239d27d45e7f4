"""The official openai SDK parses our replies, streams and errors (in-process over ASGI)."""

from __future__ import annotations

import json

import pytest

from pymllm.configs.server_config import ServerConfig
from pymllm.server import create_app
from pymllm.server.testing import FakeEngineClient, ScriptedReply

openai = pytest.importorskip("openai")  # a dev dependency, absent where only `pytest -m gpu` is set up
httpx2 = pytest.importorskip("httpx2")  # the SDK's own HTTP client: its ASGI transport

pytestmark = pytest.mark.anyio

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _sdk(fake, sdk_key="unused", **config):
    app = create_app(fake, ServerConfig(**config))
    transport = httpx2.ASGITransport(app=app)
    return openai.AsyncOpenAI(
        api_key=sdk_key, base_url="http://testserver/v1", max_retries=0,
        http_client=httpx2.AsyncClient(transport=transport, base_url="http://testserver"),
    )


async def test_chat_non_streaming_and_streaming():
    sdk = _sdk(FakeEngineClient(ScriptedReply(chunks=["Bon", "jour ", "é😀"])))
    reply = await sdk.chat.completions.create(model="fake-model", messages=USER, logprobs=True, top_logprobs=1)
    assert reply.choices[0].message.content == "Bonjour é😀"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens_details.cached_tokens == 3
    assert reply.choices[0].logprobs.content[0].top_logprobs[0].token == "Bon"

    stream = await sdk.chat.completions.create(
        model="fake-model", messages=USER, stream=True, n=2, stream_options={"include_usage": True}
    )
    texts, usage = {0: "", 1: ""}, None
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
        usage = chunk.usage or usage
    assert texts == {0: "Bonjour é😀", 1: "Bonjour é😀"}
    assert usage.completion_tokens == 6


async def test_completions():
    sdk = _sdk(FakeEngineClient(ScriptedReply(chunks=[" a", " b"], finish="length")))
    reply = await sdk.completions.create(model="default", prompt="x", max_tokens=2, echo=True, logprobs=1)
    assert reply.choices[0].text == "x a b" and reply.choices[0].finish_reason == "length"
    # echo with logprobs: the (scripted) prompt's scores lead, the first one null
    logprobs = reply.choices[0].logprobs
    assert logprobs.tokens == ["P", "Q", " a", " b"] and logprobs.token_logprobs[:2] == [None, -0.5]
    assert logprobs.top_logprobs[0] is None and logprobs.text_offset[2:] == [1, 3]
    stream = await sdk.completions.create(model="default", prompt=[1, 2], stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == " a b"


async def test_tool_calls_and_reasoning_through_the_sdk():
    chunks = ["<think>\nhmm\n</think>\n\n", '<tool_call>\n{"name": "lookup", "arguments": {"q": "x"}}\n</tool_call>']
    sdk = _sdk(FakeEngineClient(ScriptedReply(chunks=chunks)), reasoning_parser="qwen3")
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    reply = await sdk.chat.completions.create(model="fake-model", messages=USER, tools=tools)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls[0].function.name == "lookup"
    assert json.loads(message.tool_calls[0].function.arguments) == {"q": "x"}
    assert message.model_extra["reasoning_content"] == "hmm"

    stream = await sdk.chat.completions.create(model="fake-model", messages=USER, tools=tools, stream=True)
    arguments, names, finish = "", [], None
    async for chunk in stream:
        choice = chunk.choices[0]
        for call in choice.delta.tool_calls or []:
            if call.function.name:
                names.append(call.function.name)
            arguments += call.function.arguments or ""
        finish = choice.finish_reason or finish
    assert names == ["lookup"] and json.loads(arguments) == {"q": "x"} and finish == "tool_calls"


async def test_sdk_errors():
    sdk = _sdk(FakeEngineClient())
    with pytest.raises(openai.BadRequestError):
        await sdk.chat.completions.create(model="fake-model", messages=USER, temperature=5)
    with pytest.raises(openai.NotFoundError):
        await sdk.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.AuthenticationError):
        await _sdk(FakeEngineClient(), sdk_key="wrong", api_key="right").models.list()


async def test_sdk_with_api_key():
    sdk = _sdk(FakeEngineClient(), sdk_key="k", api_key="k")
    models = await sdk.models.list()
    assert [m.id for m in models.data] == ["fake-model"]
