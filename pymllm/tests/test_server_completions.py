"""/v1/completions against a scripted engine: prompt kinds, echo, logprobs, n, streaming."""

from __future__ import annotations

import pytest

from pymllm.configs.server_config import ServerConfig
from pymllm.server import create_app
from pymllm.server.testing import FakeEngineClient, ScriptedReply, asgi_client, parse_sse

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def _post(fake, body, path="/v1/completions"):
    async with asgi_client(create_app(fake, ServerConfig())) as client:
        return await client.post(path, json=body)


async def test_text_prompt_reply_shape():
    fake = FakeEngineClient(ScriptedReply(chunks=[" there", "!"]))
    r = await _post(fake, {"model": "default", "prompt": "Hi", "max_tokens": 8})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": " there!", "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"]["total_tokens"] == 9
    req = fake.requests[0]
    assert req.text == "Hi" and req.input_ids is None and req.sampling_params["max_new_tokens"] == 8


async def test_default_max_tokens_is_openais():
    fake = FakeEngineClient()
    await _post(fake, {"prompt": "Hi"})
    assert fake.requests[0].sampling_params["max_new_tokens"] == 16


async def test_token_id_prompt_and_batches():
    fake = FakeEngineClient(lambda req: ScriptedReply(chunks=[req.rid.rsplit("-", 1)[-1]]))
    r = await _post(fake, {"prompt": [72, 105]})
    assert fake.requests[0].input_ids == [72, 105] and fake.requests[0].text is None
    fake.requests.clear()
    r = await _post(fake, {"prompt": [[72], [105, 33]], "n": 2})
    body = r.json()
    assert [q.input_ids for q in fake.requests] == [[72], [72], [105, 33], [105, 33]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == ["0", "1", "2", "3"]
    # Each prompt counted once, every choice's tokens counted.
    assert body["usage"]["prompt_tokens"] == 14 and body["usage"]["completion_tokens"] == 4
    fake.requests.clear()
    await _post(fake, {"prompt": ["a", "b"]})
    assert [q.text for q in fake.requests] == ["a", "b"]


async def test_echo_text_and_token_ids():
    fake = FakeEngineClient(ScriptedReply(chunks=[" world"]))
    assert (await _post(fake, {"prompt": "Hello", "echo": True})).json()["choices"][0]["text"] == "Hello world"
    body = (await _post(fake, {"prompt": list("Hé".encode()), "echo": True})).json()
    assert body["choices"][0]["text"] == "Hé world"
    r = await _post(fake, {"prompt": "Hello", "echo": True, "stream": True})
    texts = [e["choices"][0]["text"] for e in parse_sse(r.text)[:-1]]
    assert texts[0] == "Hello" and "".join(texts) == "Hello world"


async def test_logprobs_shape_with_text_offsets():
    fake = FakeEngineClient(ScriptedReply(chunks=["ab", "é", "c"]))
    body = (await _post(fake, {"prompt": "xy", "logprobs": 1})).json()
    lp = body["choices"][0]["logprobs"]
    assert lp == {
        "tokens": ["ab", "é", "c"],
        "token_logprobs": [-0.25, -0.25, -0.25],
        "top_logprobs": [{"ab": -0.25}, {"é": -0.25}, {"c": -0.25}],
        "text_offset": [0, 2, 3],
    }
    assert fake.requests[-1].sampling_params["top_logprobs"] == 1
    assert "prompt_logprobs" not in fake.requests[-1].sampling_params
    r = await _post(fake, {"prompt": "xy", "logprobs": 2, "stream": True})
    lps = [e["choices"][0]["logprobs"] for e in parse_sse(r.text)[:-1]]
    assert [lp["text_offset"] for lp in lps] == [[0], [2], [3]]
    assert lps[0]["top_logprobs"] == [{"ab": -0.25, "alt": -1.5}]


async def test_echo_with_logprobs_scores_the_prompt():
    # As OpenAI's legacy API: the prompt's tokens lead the logprobs, the first without a value.
    fake = FakeEngineClient(ScriptedReply(chunks=["ab", "é", "c"]))
    body = (await _post(fake, {"prompt": "xy", "echo": True, "logprobs": 1})).json()
    assert fake.requests[-1].sampling_params["prompt_logprobs"] is True
    assert body["choices"][0]["text"] == "xyabéc"
    assert body["choices"][0]["logprobs"] == {
        "tokens": ["P", "Q", "ab", "é", "c"],
        "token_logprobs": [None, -0.5, -0.25, -0.25, -0.25],
        "top_logprobs": [None, {"Q": -0.5}, {"ab": -0.25}, {"é": -0.25}, {"c": -0.25}],
        "text_offset": [0, 1, 2, 4, 5],
    }
    # Streamed, the echo waits for the prompt's scores and comes first, with them.
    r = await _post(fake, {"prompt": "xy", "echo": True, "logprobs": 2, "stream": True})
    choices = [e["choices"][0] for e in parse_sse(r.text)[:-1]]
    assert [c["text"] for c in choices] == ["xy", "ab", "é", "c"]
    assert choices[0]["logprobs"] == {
        "tokens": ["P", "Q"], "token_logprobs": [None, -0.5],
        "top_logprobs": [None, {"Q": -0.5, "alt": -2.0}], "text_offset": [0, 1],
    }
    assert [c["logprobs"]["text_offset"] for c in choices[1:]] == [[2], [4], [5]]


async def test_zero_max_tokens_scores_only():
    fake = FakeEngineClient(ScriptedReply(chunks=[]))
    r = await _post(fake, {"prompt": "xy", "echo": True, "logprobs": 0, "max_tokens": 0})
    assert r.status_code == 200
    params = fake.requests[-1].sampling_params
    assert params["max_new_tokens"] == 0 and params["prompt_logprobs"] is True and params["top_logprobs"] == 0
    # Chat has no prompt scoring: a reply of no tokens is a client mistake there.
    r = await _post(fake, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "/v1/chat/completions")
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


async def test_streaming_finish_and_usage():
    fake = FakeEngineClient(ScriptedReply(chunks=["a", "b"], finish="length"))
    r = await _post(fake, {"prompt": "x", "stream": True, "n": 2, "stream_options": {"include_usage": True}})
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    finishes = sorted(
        (c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in chunks
        if c["choices"] and c["choices"][0]["finish_reason"]
    )
    assert finishes == [(0, "length"), (1, "length")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_completion_specific_validation():
    fake = FakeEngineClient()
    for body, needle in [
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": ""}, "empty"),
        ({"prompt": []}, "empty"),
        ({"prompt": [[1], []]}, "empty"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [300]}, "vocabulary"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "logit_bias": {"a": 5}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"1": 500}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"-1": 5}}, "logit_bias"),
    ]:
        r = await _post(fake, body)
        assert r.status_code == 400, body
        assert needle in r.json()["error"]["message"], (body, r.json())
    assert fake.requests == []
