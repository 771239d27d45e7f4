"""/tokenize and /detokenize: the ids a prompt or a chat becomes (the chat through the same
template call as the tokenizer process), text back from ids, and their 400s / 404s."""

from __future__ import annotations

import pytest

from pymllm.configs.server_config import ServerConfig
from pymllm.engine.io_struct import GenerateReqInput
from pymllm.orchestrator.tokenizer_process import RequestTokenizer
from pymllm.server import create_app
from pymllm.server.testing import ByteTokenizer, FakeEngineClient, asgi_client

pytestmark = pytest.mark.anyio
USER = [{"role": "user", "content": "héllo"}]


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def _post(path, body, fake=None):
    fake = fake or FakeEngineClient(tokenizer=ByteTokenizer(think_prompt=True))
    async with asgi_client(create_app(fake, ServerConfig())) as client:
        return await client.post(path, json=body)


async def test_a_prompt_and_a_chat_tokenize_as_the_engine_would():
    r = await _post("/tokenize", {"prompt": "héllo", "return_token_strs": True})
    assert r.status_code == 200
    assert r.json() == {"count": 6, "max_model_len": 4096, "tokens": list("héllo".encode()),
                        "token_strs": [chr(b) for b in "héllo".encode()]}
    tok = ByteTokenizer(think_prompt=True)
    for kwargs in ({}, {"chat_template_kwargs": {"enable_thinking": False}}, {"add_generation_prompt": False}):
        r = await _post("/tokenize", {"messages": USER, **kwargs})
        # The oracle: what the tokenizer process builds for the same chat request.
        want = RequestTokenizer(tok, 4096, {}).prompt_ids(GenerateReqInput(
            rid="x", messages=USER, chat_template_kwargs=kwargs.get("chat_template_kwargs"),
            add_generation_prompt=kwargs.get("add_generation_prompt", True)))
        assert r.json()["tokens"] == want and r.json()["count"] == len(want) and r.json()["token_strs"] is None
    r = await _post("/detokenize", {"tokens": list("héllo".encode())})
    assert r.status_code == 200 and r.json() == {"prompt": "héllo"}


@pytest.mark.parametrize("path, body, needle", [
    ("/tokenize", {}, "exactly one of prompt or messages"),
    ("/tokenize", {"prompt": "a", "messages": USER}, "exactly one of prompt or messages"),
    ("/tokenize", {"prompt": "a", "tools": [{"type": "function", "function": {"name": "f"}}]}, "go with messages"),
    ("/tokenize", {"messages": USER, "chat_template_kwargs": {"tokenize": False}}, "cannot set tokenize"),
    ("/tokenize", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]}, "images"),
    ("/detokenize", {"tokens": [65, 256]}, "out of range [0, 256): [256]"),
    ("/detokenize", {"tokens": [-1]}, "out of range"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
async def test_bad_requests_are_400(path, body, needle):
    r = await _post(path, body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


async def test_an_unknown_model_is_404():
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [65]})):
        r = await _post(path, {"model": "gpt-9", **body})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
