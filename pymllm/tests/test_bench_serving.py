"""bench_serving against the real HTTP app (scripted engine): in-process and over loopback TCP."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import pytest
import uvicorn
from PIL import Image

from pymllm import bench_serving
from pymllm.configs.server_config import ServerConfig
from pymllm.server import create_app
from pymllm.server.testing import FakeEngineClient, ScriptedReply, asgi_client

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _script(req):
    count = req.sampling_params["max_new_tokens"]
    prompt_tokens = len(req.input_ids) if req.input_ids is not None else 5
    return ScriptedReply(chunks=["tok "] * count, finish="length", prompt_tokens=prompt_tokens, cached_tokens=0)


async def test_run_benchmark_in_process():
    fake = FakeEngineClient(_script)
    args = bench_serving.parse_args(
        ["--num-prompts", "6", "--input-len", "12", "--output-len", "4", "--concurrency", "2", "--seed", "3",
         "--vocab-size", "256"]
    )
    async with asgi_client(create_app(fake, ServerConfig())) as client:
        row = await bench_serving.run_benchmark(args, client)
    assert row["completed"] == 6 and row["failed"] == 0
    assert row["total_input_tokens"] == 72 and row["total_output_tokens"] == 24
    assert all(len(r.input_ids) == 12 for r in fake.requests)
    assert all(r.sampling_params["ignore_eos"] and r.sampling_params["max_new_tokens"] == 4 for r in fake.requests)
    assert len({tuple(r.input_ids) for r in fake.requests}) == 6  # random: distinct prompts
    for key in ("ttft", "itl", "tpot", "e2e_latency"):
        assert {f"mean_{key}_ms", f"median_{key}_ms", f"p99_{key}_ms", f"max_{key}_ms"} <= set(row)
        assert row[f"max_{key}_ms"] >= row[f"p99_{key}_ms"] >= row[f"median_{key}_ms"]
    assert "Successful requests:" in bench_serving.format_table(row)
    assert "Max ITL (ms):" in bench_serving.format_table(row)


async def test_fixed_dataset_and_chat_backend():
    fake = FakeEngineClient(_script)
    args = bench_serving.parse_args(
        ["--num-prompts", "3", "--input-len", "5", "--output-len", "2", "--dataset", "fixed", "--backend", "chat"]
    )
    async with asgi_client(create_app(fake, ServerConfig())) as client:
        row = await bench_serving.run_benchmark(args, client)
    assert row["completed"] == 3 and row["total_output_tokens"] == 6
    contents = {r.messages[0]["content"] for r in fake.requests}
    assert len(contents) == 1 and len(next(iter(contents)).split()) == 5


async def test_chat_requests_carry_images():
    fake = FakeEngineClient(_script)
    args = bench_serving.parse_args(
        ["--num-prompts", "3", "--input-len", "4", "--output-len", "2", "--backend", "chat", "--image", "16x8",
         "--images-per-request", "2", "--seed", "5"]
    )
    async with asgi_client(create_app(fake, ServerConfig())) as client:
        row = await bench_serving.run_benchmark(args, client)
    assert row["completed"] == 3 and row["image_size"] == "16x8" and row["images_per_request"] == 2
    urls = []
    for req in fake.requests:
        (message,) = req.messages
        *images, text = message["content"]
        assert text["type"] == "text" and len(text["text"].split()) == 4
        assert [part["type"] for part in images] == ["image_url", "image_url"]
        urls += [part["image_url"]["url"] for part in images]
    prefix = "data:image/png;base64,"
    assert all(url.startswith(prefix) for url in urls) and len(set(urls)) == 6  # random: distinct images
    image = Image.open(io.BytesIO(base64.b64decode(urls[0][len(prefix):])))
    assert image.size == (16, 8) and image.mode == "RGB"
    # Seeded: the same arguments give the same images.
    assert bench_serving.make_prompts(args)[0][:2] == fake.requests[0].messages[0]["content"][:2]
    fixed = bench_serving.make_prompts(bench_serving.parse_args(
        ["--num-prompts", "2", "--backend", "chat", "--image", "8x8", "--dataset", "fixed"]))
    assert fixed[0] == fixed[1]


def test_images_need_the_chat_backend():
    assert "image_size" not in bench_serving.summarise(bench_serving.parse_args(["--backend", "chat"]), "m", [], 1.0)
    for argv in (["--image", "8x8"], ["--backend", "generate", "--image", "8x8"],
                 ["--backend", "chat", "--image", "8"], ["--backend", "chat", "--image", "8x8", "--images-per-request", "0"]):
        with pytest.raises(SystemExit):
            bench_serving.parse_args(argv)


async def test_failures_are_counted():
    fake = FakeEngineClient(ScriptedReply(reject=(400, "too long")))
    args = bench_serving.parse_args(
        ["--num-prompts", "2", "--input-len", "3", "--output-len", "2", "--vocab-size", "256"]
    )
    async with asgi_client(create_app(fake, ServerConfig())) as client:
        row = await bench_serving.run_benchmark(args, client)
    assert row["completed"] == 0 and row["failed"] == 2 and "too long" in row["first_error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_main_over_loopback_writes_jsonl(tmp_path, capsys):
    port = _free_port()
    fake = FakeEngineClient(lambda req: ScriptedReply(**{**_script(req).__dict__, "delay_s": 0.002}))
    server = uvicorn.Server(uvicorn.Config(create_app(fake, ServerConfig()), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 10
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        out = tmp_path / "bench.jsonl"
        argv = ["--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "4", "--input-len", "8",
                "--output-len", "5", "--request-rate", "50", "--seed", "1", "--result-filename", str(out),
                "--vocab-size", "256"]
        assert bench_serving.main(argv) == 0
        assert bench_serving.main(argv) == 0
    finally:
        server.should_exit = True
        thread.join(10)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    row = rows[0]
    assert row["completed"] == 4 and row["total_output_tokens"] == 20 and row["total_input_tokens"] == 32
    assert row["request_rate"] == 50 and row["median_ttft_ms"] > 0 and row["p99_itl_ms"] > 0
    assert "Output token throughput" in capsys.readouterr().out


def test_shared_prefix_prompts():
    args = bench_serving.parse_args(
        ["--num-prompts", "4", "--input-len", "5", "--shared-prefix-len", "20", "--vocab-size", "500"]
    )
    prompts = bench_serving.make_prompts(args)
    assert all(len(p) == 25 for p in prompts)
    assert len({tuple(p[:20]) for p in prompts}) == 1, "every prompt starts with the same prefix"
    assert len({tuple(p[20:]) for p in prompts}) == 4
    chat = bench_serving.make_prompts(bench_serving.parse_args(
        ["--num-prompts", "3", "--input-len", "4", "--shared-prefix-len", "6", "--backend", "chat"]))
    assert len({" ".join(p.split()[:6]) for p in chat}) == 1
    with pytest.raises(SystemExit):
        bench_serving.parse_args(["--shared-prefix-len", "-1"])


async def test_score_mode_sends_lm_eval_shaped_requests():
    fake = FakeEngineClient(_script)
    args = bench_serving.parse_args(["--score", "--output-len", "0", "--num-prompts", "3", "--input-len", "4",
                                     "--shared-prefix-len", "8", "--vocab-size", "256"])
    async with asgi_client(create_app(fake, ServerConfig())) as client:
        row = await bench_serving.run_benchmark(args, client)
    assert row["completed"] == 3 and row["score"] and row["total_output_tokens"] == 0
    assert all(r.sampling_params["max_new_tokens"] == 0 and r.sampling_params["prompt_logprobs"]
               for r in fake.requests)
    with pytest.raises(SystemExit):
        bench_serving.parse_args(["--output-len", "0"])  # generating nothing only makes sense when scoring
    with pytest.raises(SystemExit):
        bench_serving.parse_args(["--score", "--backend", "chat"])


def test_generate_backend_counts_token_chunks():
    args = bench_serving.parse_args(["--backend", "generate", "--num-prompts", "1", "--input-len", "3"])
    body = bench_serving._request_body(args, "m", [5, 6, 7])
    assert body["input_ids"] == [5, 6, 7] and body["stream"] is True
    assert body["sampling_params"]["ignore_eos"] is True
    # A token that does not complete a character yet still counts as output for TTFT.
    assert bench_serving._chunk_has_output({"text": "", "output_ids": [200]})
    assert not bench_serving._chunk_has_output({"text": "", "output_ids": []})
    assert bench_serving._chunk_has_output({"choices": [{"text": "a"}]})


def test_aiohttp_client_reports_rejections_and_dead_servers():
    port = _free_port()
    fake = FakeEngineClient(ScriptedReply(reject=(400, "too long")))
    server = uvicorn.Server(uvicorn.Config(create_app(fake, ServerConfig()), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    args = bench_serving.parse_args(["--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "2",
                                     "--input-len", "3", "--output-len", "2", "--vocab-size", "256"])
    try:
        deadline = time.time() + 10
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        row = bench_serving.asyncio.run(bench_serving._main(args))
    finally:
        server.should_exit = True
        thread.join(10)
    assert row["completed"] == 0 and row["failed"] == 2 and "HTTP 400" in row["first_error"]
    assert "too long" in row["first_error"]

    async def against_nothing():
        async with bench_serving.AiohttpClient(f"http://127.0.0.1:{_free_port()}", {}, 5.0) as client:
            return await bench_serving.send_request(client, args, "m", [20, 21, 22])

    result = bench_serving.asyncio.run(against_nothing())
    assert not result.ok and "ClientConnectorError" in result.error
