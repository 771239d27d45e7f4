"""EngineClient routing: token-id requests (and their aborts) go straight to the scheduler, the
rest through the tokenizer process; invalid token-id requests are rejected in the frontend, and a
request whose tokenization raises ends with a 500 (tokenize_or_reply, shared with the tokenizer
process) instead of taking anything down."""

from __future__ import annotations

import asyncio

import pytest
import zmq
from transformers import AutoTokenizer

from pymllm.engine.client import EngineClient
from pymllm.engine.io_struct import (
    AbortReq,
    BatchRequestOutput,
    FinishReason,
    GenerateReqInput,
    RequestOutput,
    TokenizedGenerateReq,
)
from pymllm.orchestrator.ipc import Endpoints, pull, push
from pymllm.orchestrator.tokenizer_process import InvalidRequest, RequestTokenizer, tokenize_or_reply
from pymllm.testing.tiny_models import build_tiny_tokenizer


@pytest.fixture
def wired_with_endpoints(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "tok"))
    endpoints = Endpoints.create()
    ctx = zmq.Context.instance()
    to_tokenizer, to_scheduler = pull(ctx, endpoints.tokenizer_in), pull(ctx, endpoints.scheduler_in)
    inbox = pull(ctx, endpoints.frontend_in)
    client = EngineClient(endpoints, inbox, "tiny", 64, tokenizer,
                          request_tokenizer=RequestTokenizer(tokenizer, 64, {"temperature": 0.5}))
    yield client, to_tokenizer, to_scheduler, endpoints
    client.close()
    for sock in (to_tokenizer, to_scheduler):
        sock.close()


@pytest.fixture
def wired(wired_with_endpoints):
    return wired_with_endpoints[:3]


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


def test_a_request_whose_tokenization_raises_gets_a_500_and_the_rest_go_on(wired, monkeypatch):
    client, _, to_scheduler = wired
    worker = client._request_tokenizer
    original = worker.tokenize

    def tokenize(req):
        if req.rid == "boom":
            raise RuntimeError("a bug in tokenization")
        return original(req)

    monkeypatch.setattr(worker, "tokenize", tokenize)

    async def first(rid):
        async for out in client.generate(GenerateReqInput(rid=rid, input_ids=[5, 6])):
            return out

    out = asyncio.run(first("boom"))
    assert out.finished and out.finish_reason.status_code == 500 and "internal error" in out.finish_reason.message
    assert _recv(to_scheduler, 0.2) is None
    asyncio.run(_first_then_abandon(client, GenerateReqInput(rid="fine", input_ids=[5, 6], stream=True)))
    assert isinstance(_recv(to_scheduler), TokenizedGenerateReq)


def test_tokenize_or_reply_routes_each_outcome(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "tok"))
    worker = RequestTokenizer(tokenizer, 64, {})
    assert isinstance(tokenize_or_reply(worker, GenerateReqInput(rid="ok", text="hello")), TokenizedGenerateReq)
    refused = tokenize_or_reply(worker, GenerateReqInput(rid="empty", text=""))
    assert isinstance(refused, BatchRequestOutput) and refused.outputs[0].finish_reason.status_code == 400
    worker.tokenize = lambda req: 1 / 0
    failed = tokenize_or_reply(worker, GenerateReqInput(rid="bug", text="hello"))
    assert isinstance(failed, BatchRequestOutput)
    (out,) = failed.outputs
    assert out.rid == "bug" and out.finished and out.finish_reason.status_code == 500


@pytest.mark.parametrize("status, aborted", [(500, True), (None, False)])
def test_a_reply_ended_by_a_failure_outside_the_scheduler_aborts_its_generation(wired_with_endpoints, status, aborted):
    client, _, to_scheduler, endpoints = wired_with_endpoints
    worker_side = push(zmq.Context.instance(), endpoints.frontend_in)

    async def run():
        gen = client.generate(GenerateReqInput(rid="ids", input_ids=[5, 6], stream=True))
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.05)
        reason = FinishReason("abort", message="internal error", status_code=status) if status else FinishReason("length")
        worker_side.send(BatchRequestOutput([RequestOutput("ids", "", [], True, reason)]))
        out = await asyncio.wait_for(first, 5)
        await gen.aclose()
        return out

    out = asyncio.run(run())
    worker_side.close()
    assert out.finished
    assert isinstance(_recv(to_scheduler), TokenizedGenerateReq)
    assert (_recv(to_scheduler, 0.3) == AbortReq("ids")) is aborted


def test_a_tool_calling_turn_without_content_renders_with_a_concatenating_template(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "tok"))
    # SmolLM2's ChatML template joins role and content with "+": null content is a TypeError there.
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    worker = RequestTokenizer(tokenizer, 256, {})
    call = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": call},
             {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    ids = worker.prompt_ids(GenerateReqInput(rid="t", messages=turns))
    assert ids == tokenizer.encode("user: hi\nassistant: \ntool: 42\n", add_special_tokens=False)
    # Other template failures are still the client's 400.
    tokenizer.chat_template = "{{ raise_exception('no tools here') }}"
    with pytest.raises(InvalidRequest, match="no tools here"):
        worker.prompt_ids(GenerateReqInput(rid="t", messages=turns))
