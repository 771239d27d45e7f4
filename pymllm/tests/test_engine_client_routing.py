"""EngineClient routing: token-id requests (and their aborts) go straight to the scheduler, the
rest through the tokenizer process; invalid token-id requests are rejected in the frontend."""

from __future__ import annotations

import asyncio

import pytest
import zmq
from transformers import AutoTokenizer

from pymllm.engine.client import EngineClient
from pymllm.engine.io_struct import AbortReq, GenerateReqInput, TokenizedGenerateReq
from pymllm.orchestrator.ipc import Endpoints, pull
from pymllm.orchestrator.tokenizer_process import RequestTokenizer
from pymllm.testing.tiny_models import build_tiny_tokenizer


@pytest.fixture
def wired(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "tok"))
    endpoints = Endpoints.create()
    ctx = zmq.Context.instance()
    to_tokenizer, to_scheduler = pull(ctx, endpoints.tokenizer_in), pull(ctx, endpoints.scheduler_in)
    inbox = pull(ctx, endpoints.frontend_in)
    client = EngineClient(endpoints, inbox, "tiny", 64, tokenizer,
                          request_tokenizer=RequestTokenizer(tokenizer, 64, {"temperature": 0.5}))
    yield client, to_tokenizer, to_scheduler
    client.close()
    for sock in (to_tokenizer, to_scheduler):
        sock.close()


def _recv(sock, timeout_s=5.0):
    if sock.socket.poll(int(timeout_s * 1000)):
        return sock.recv()
    return None


async def _first_then_abandon(client, req):
    gen = client.generate(req)
    task = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0.05)  # the request is out; nothing will answer it
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, StopAsyncIteration):
        pass
    await gen.aclose()


def test_token_ids_skip_the_tokenizer_and_so_do_their_aborts(wired):
    client, to_tokenizer, to_scheduler = wired
    asyncio.run(_first_then_abandon(client, GenerateReqInput(rid="ids", input_ids=[5, 6, 7], stream=True)))
    sent = _recv(to_scheduler)
    assert isinstance(sent, TokenizedGenerateReq) and sent.input_ids == [5, 6, 7]
    assert sent.sampling_params.temperature == 0.5  # the model's generation defaults were applied
    assert _recv(to_scheduler) == AbortReq("ids")
    assert _recv(to_tokenizer, 0.2) is None


def test_text_goes_through_the_tokenizer(wired):
    client, to_tokenizer, to_scheduler = wired
    asyncio.run(_first_then_abandon(client, GenerateReqInput(rid="txt", text="hello", stream=True)))
    assert isinstance(_recv(to_tokenizer), GenerateReqInput)
    assert _recv(to_tokenizer) == AbortReq("txt")
    assert _recv(to_scheduler, 0.2) is None


def test_bad_token_ids_are_rejected_in_the_frontend(wired):
    client, _, to_scheduler = wired

    async def first():
        async for out in client.generate(GenerateReqInput(rid="bad", input_ids=[10**9])):
            return out

    out = asyncio.run(first())
    assert out.finished and out.finish_reason.status_code == 400 and "out of range" in out.finish_reason.message
    assert _recv(to_scheduler, 0.2) is None
