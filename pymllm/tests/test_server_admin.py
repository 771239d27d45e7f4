"""Health, models, metrics, server_info, abort, flush, native /generate, and client disconnects."""

from __future__ import annotations

import asyncio
import json

import pytest

from pymllm.configs.server_config import ServerConfig
from pymllm.server import create_app
from pymllm.server.testing import FakeEngineClient, ScriptedReply, asgi_client, parse_sse

pytestmark = pytest.mark.anyio

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_health():
    fake = FakeEngineClient()
    async with asgi_client(create_app(fake, ServerConfig())) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/health_generate")).status_code == 200
        assert fake.requests[-1].sampling_params["max_new_tokens"] == 1
        fake.healthy = False
        r = await client.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert (await client.get("/health_generate")).status_code == 503


async def test_health_generate_reports_a_failed_generation():
    fake = FakeEngineClient(ScriptedReply(reject=(500, "scheduler failed")))
    async with asgi_client(create_app(fake, ServerConfig())) as client:
        r = await client.get("/health_generate")
    assert r.status_code == 503 and "scheduler failed" in r.json()["error"]["message"]


async def test_models():
    async with asgi_client(create_app(FakeEngineClient(context_length=2048), ServerConfig())) as client:
        body = (await client.get("/v1/models")).json()
        assert body["object"] == "list"
        (card,) = body["data"]
        assert card["id"] == "fake-model" and card["object"] == "model" and card["max_model_len"] == 2048
        assert (await client.get("/v1/models/fake-model")).json()["id"] == "fake-model"
        assert (await client.get("/v1/models/other")).status_code == 404


async def test_metrics_exposition():
    fake = FakeEngineClient(ScriptedReply(chunks=["a", "b", "c"]))
    async with asgi_client(create_app(fake, ServerConfig())) as client:
        await client.post("/v1/chat/completions", json={"messages": USER})
        await client.post("/v1/chat/completions", json={"messages": USER, "temperature": 9})
        r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "pymllm_requests_total", "pymllm_prompt_tokens_total", "pymllm_generation_tokens_total",
        "pymllm_num_requests_running", "pymllm_num_requests_queued", "pymllm_kv_cache_usage_ratio",
        "pymllm_time_to_first_token_seconds_bucket", "pymllm_inter_token_latency_seconds_bucket",
        "pymllm_e2e_request_latency_seconds_bucket",
    ):
        assert name in text, name
    assert 'pymllm_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in text
    assert 'pymllm_requests_total{endpoint="/v1/chat/completions",status="400"} 1.0' in text
    assert "pymllm_generation_tokens_total 3.0" in text
    assert "pymllm_num_requests_running 2.0" in text
    # 96 slots in use, 32 of them evictable cached prefixes: requests hold 64 of 256.
    assert "pymllm_kv_cache_used_tokens 64.0" in text and "pymllm_kv_cache_evictable_tokens 32.0" in text
    assert "pymllm_kv_cache_usage_ratio 0.25" in text
    assert "pymllm_inter_token_latency_seconds_count 2.0" in text


async def test_metrics_registries_are_per_app():
    a, b = create_app(FakeEngineClient(), ServerConfig()), create_app(FakeEngineClient(), ServerConfig())
    async with asgi_client(a) as ca, asgi_client(b) as cb:
        await ca.post("/v1/completions", json={"prompt": "x"})
        assert "pymllm_generation_tokens_total 2.0" in (await ca.get("/metrics")).text
        assert "pymllm_generation_tokens_total 0.0" in (await cb.get("/metrics")).text


async def test_server_info_and_flush_cache():
    fake = FakeEngineClient()
    async with asgi_client(create_app(fake, ServerConfig())) as client:
        info = (await client.get("/server_info")).json()
        assert info["running"] == 2 and info["kv_total"] == 256
        r = await client.post("/flush_cache")
        assert r.status_code == 200 and r.json()["success"] is True
        fake.flush_ok = False
        r = await client.post("/flush_cache")
        assert r.status_code == 400 and r.json()["error"]["message"] == "requests are running"


async def test_abort_request_aborts_all_choices_of_an_api_id():
    fake = FakeEngineClient(ScriptedReply(chunks=["x"] * 200, delay_s=0.005))
    async with asgi_client(create_app(fake, ServerConfig())) as client:
        pending = asyncio.create_task(client.post("/v1/chat/completions", json={"messages": USER, "n": 2}))
        while len(fake.requests) < 2:
            await asyncio.sleep(0.01)
        api_id = fake.requests[0].rid.rsplit("-", 1)[0]
        assert (await client.post("/abort_request", json={"rid": api_id})).json() == {"success": True}
        body = (await pending).json()
    assert sorted(fake.aborted) == [f"{api_id}-0", f"{api_id}-1"]
    assert [c["finish_reason"] for c in body["choices"]] == ["abort", "abort"]


async def test_native_generate():
    fake = FakeEngineClient(ScriptedReply(chunks=["Hel", "lo"], finish="length"))
    async with asgi_client(create_app(fake, ServerConfig())) as client:
        r = await client.post("/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
        body = r.json()
        assert body["text"] == "Hello" and body["output_ids"] == [100, 101]
        meta = body["meta_info"]
        assert (meta["prompt_tokens"], meta["completion_tokens"], meta["cached_tokens"]) == (7, 2, 3)
        assert meta["finish_reason"]["type"] == "length"
        assert fake.requests[0].input_ids == [1, 2] and fake.requests[0].sampling_params == {"max_new_tokens": 2}

        r = await client.post("/generate", json={"text": "x", "stream": True, "rid": "mine",
                                                 "sampling_params": {"logprobs": True, "top_logprobs": 1}})
        events = parse_sse(r.text)
        assert events[-1] == "[DONE]"
        assert [e["text"] for e in events[:-1]] == ["Hel", "lo"]
        assert events[-1 - 1]["meta_info"]["finish_reason"]["type"] == "length"
        assert events[0]["meta_info"]["finish_reason"] is None
        assert events[0]["meta_info"]["output_token_logprobs"] == [["Hel", -0.25, [["Hel", -0.25]]]]
        assert fake.requests[-1].rid == "mine"

        for bad in ({"text": "x", "input_ids": [1]}, {}, {"text": "x", "sampling_params": {"nope": 1}},
                    {"text": "x", "sampling_params": {"temperature": -1}}, {"input_ids": [999]}):
            r = await client.post("/generate", json=bad)
            assert r.status_code == 400 and "error" in r.json(), bad


# ---------------------------------------------------------------- client disconnects


async def _call_then_disconnect(app, path, body, disconnect_after_body_chunks, spec_version):
    """Drive the ASGI app directly so the client can vanish mid-request."""
    payload = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
    }
    gone = asyncio.Event()
    body_sent = False
    chunks = []

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if len(chunks) >= disconnect_after_body_chunks:
                gone.set()

    task = asyncio.create_task(app(scope, receive, send))
    if disconnect_after_body_chunks == 0:
        await asyncio.sleep(0.05)
        gone.set()
    await asyncio.wait_for(task, 5)
    return chunks


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": USER, "stream": True}),
    ("/v1/completions", {"prompt": "x", "stream": True, "n": 2}),
    ("/generate", {"text": "x", "stream": True}),
])
async def test_streaming_disconnect_aborts(spec_version, path, body):
    fake = FakeEngineClient(ScriptedReply(chunks=["x"] * 500, delay_s=0.002))
    chunks = await _call_then_disconnect(create_app(fake, ServerConfig()), path, body, 3, spec_version)
    assert len(chunks) < 100
    assert sorted(fake.aborted) == sorted(r.rid for r in fake.requests)
    assert fake.aborted


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": USER, "n": 2}),
    ("/v1/completions", {"prompt": "x"}),
    ("/generate", {"text": "x"}),
])
async def test_non_streaming_disconnect_aborts(path, body):
    fake = FakeEngineClient(ScriptedReply(chunks=["x"] * 500, delay_s=0.002))
    await _call_then_disconnect(create_app(fake, ServerConfig()), path, body, 0, "2.3")
    assert sorted(fake.aborted) == sorted(r.rid for r in fake.requests)
    assert fake.aborted


async def test_disconnect_while_waiting_for_the_first_chunk_aborts():
    fake = FakeEngineClient(ScriptedReply(chunks=["x"], delay_s=1.0))
    await _call_then_disconnect(
        create_app(fake, ServerConfig()), "/v1/chat/completions", {"messages": USER, "stream": True}, 0, "2.4"
    )
    assert fake.aborted == [fake.requests[0].rid]


async def test_finished_requests_are_not_aborted():
    fake = FakeEngineClient(ScriptedReply(chunks=["a", "b"]))
    async with asgi_client(create_app(fake, ServerConfig())) as client:
        await client.post("/v1/chat/completions", json={"messages": USER, "stream": True})
        await client.post("/v1/chat/completions", json={"messages": USER})
    assert fake.aborted == []
