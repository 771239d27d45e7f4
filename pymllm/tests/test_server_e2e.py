"""The real server in a subprocess (tiny Qwen3 + local tokenizer), driven by the openai SDK."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from pymllm.engine.launch import Engine
from pymllm.testing.tiny_models import tiny_model_dir
from pymllm.tests.server_process import ServerProcess, child_pids, pid_alive

openai = pytest.importorskip("openai")  # a dev dependency, absent where only `pytest -m gpu` is set up

API_KEY = "sk-test"
MAX_RUNNING = 4
MAX_QUEUED = 4


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerProcess(
        ["--server.model_path", str(model_dir), "--server.max_total_tokens", "4096",
         "--server.max_running_requests", str(MAX_RUNNING), "--server.max_queued_requests", str(MAX_QUEUED),
         "--server.reasoning_parser", "qwen3", "--server.served_model_name", "tiny-qwen3"],
        api_key=API_KEY,
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0)


CHAT = [{"role": "user", "content": "Tell me about the weather."}]


def test_models_and_auth(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-qwen3"]
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
    bad = httpx.post(server.base_url + "/v1/chat/completions", json={}, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and "error" in bad.json()
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_chat_non_stream_has_usage(client):
    r = client.chat.completions.create(model="tiny-qwen3", messages=CHAT, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_stream_and_sends_usage(client):
    kw = dict(model="tiny-qwen3", messages=CHAT, max_tokens=10, temperature=0,
              extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_stream_and_echo(client):
    whole = client.completions.create(model="tiny-qwen3", prompt="the number", max_tokens=6, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-qwen3", prompt="the number", max_tokens=6, temperature=0, stream=True))
    assert streamed == whole.choices[0].text
    echo = client.completions.create(model="tiny-qwen3", prompt="the number", max_tokens=6, temperature=0, echo=True)
    assert echo.choices[0].text == "the number" + whole.choices[0].text


def test_echo_with_logprobs_scores_the_prompt_as_transformers(server, client, model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "the number seven is"
    ids = AutoTokenizer.from_pretrained(model_dir)(prompt).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    kw = dict(model="tiny-qwen3", prompt=prompt, temperature=0, echo=True, logprobs=2)
    r = client.completions.create(max_tokens=2, extra_body={"ignore_eos": True}, **kw)
    lp = r.choices[0].logprobs
    assert r.usage.prompt_tokens == len(ids) and len(lp.tokens) == len(ids) + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for p in range(1, len(ids)):
        assert lp.token_logprobs[p] == pytest.approx(reference[p - 1, ids[p]].item(), abs=1e-3)
        assert len(lp.top_logprobs[p]) >= 2 and max(lp.top_logprobs[p].values()) == pytest.approx(
            reference[p - 1].max().item(), abs=1e-3)
    # max_tokens 0: the prompt scored, nothing generated; streamed, the same scores.
    scored = client.completions.create(max_tokens=0, **kw).choices[0]
    assert scored.text == prompt and scored.logprobs.token_logprobs == lp.token_logprobs[: len(ids)]
    chunks = list(client.completions.create(max_tokens=2, stream=True, extra_body={"ignore_eos": True}, **kw))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    # The prompt's scores come back from the score cache as they were; the generated tokens' are
    # computed on the cached prompt this time, the same up to float rounding.
    assert streamed[: len(ids)] == lp.token_logprobs[: len(ids)]
    assert streamed[len(ids):] == pytest.approx(lp.token_logprobs[len(ids):], abs=1e-4)
    native = httpx.post(server.base_url + "/generate", headers=server.headers(), json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": 1, "prompt_logprobs": True, "top_logprobs": 1}}).json()
    entries = native["meta_info"]["input_token_logprobs"]
    assert entries[0][1:] == [None, []] and [e[1] for e in entries[1:]] == lp.token_logprobs[1 : len(ids)]


def test_multiple_choice_scoring_computes_the_context_once(client):
    """lm-eval's loglikelihood requests: one context, several continuations, echo + logprobs and
    max_tokens 0. The continuations after the first reuse the context (cached_tokens) and their
    scores equal those of the same request scored from scratch."""
    context = "Question: which city is the capital of France? Answer:"
    kw = dict(model="tiny-qwen3", temperature=0, echo=True, logprobs=1, max_tokens=0)
    fresh = client.completions.create(prompt=context + " Lyon", **kw)  # nothing of it cached yet
    client.completions.create(prompt=context + " Paris", **kw)
    again = client.completions.create(prompt=context + " Lyon", **kw)
    details = again.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens > 0
    assert again.choices[0].logprobs.tokens == fresh.choices[0].logprobs.tokens
    for got, want in zip(again.choices[0].logprobs.token_logprobs[1:], fresh.choices[0].logprobs.token_logprobs[1:]):
        assert got == pytest.approx(want, abs=1e-4)


def test_response_format_json_schema(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    kw = dict(model="tiny-qwen3", messages=CHAT, max_tokens=48, temperature=0, response_format=fmt,
              extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    r = client.chat.completions.create(**kw)
    value = json.loads(r.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop" and isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == r.choices[0].message.content
    # The schema bounds the reply's length (compact JSON, no free strings), so every reply ends
    # with the grammar, sampled ones and completions' too.
    sampled = client.chat.completions.create(**{**kw, "temperature": 1.0, "seed": 5, "n": 3})
    for choice in sampled.choices:
        assert choice.finish_reason == "stop"
        assert set(json.loads(choice.message.content)) == {"ok", "n"}
    obj = client.completions.create(model="tiny-qwen3", prompt="{", max_tokens=48, temperature=0,
                                    extra_body={"response_format": fmt})
    assert obj.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.choices[0].text), dict)
    with pytest.raises(openai.BadRequestError, match="cannot be followed"):
        client.chat.completions.create(**{**kw, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}})


def test_regex_and_choice_constraints(client, server):
    """SGLang's regex, vLLM's structured_outputs choice and /generate's ebnf, on the real server."""
    import re

    kw = dict(model="tiny-qwen3", messages=CHAT, max_tokens=24, temperature=1.0, seed=3,
              extra_body={"chat_template_kwargs": {"enable_thinking": False}, "regex": "(yes|no)-[0-9]{2}"})
    for choice in client.chat.completions.create(n=3, **kw).choices:
        assert choice.finish_reason == "stop" and re.fullmatch("(yes|no)-[0-9]{2}", choice.message.content)
    picked = client.completions.create(model="tiny-qwen3", prompt="Pick:", max_tokens=16, temperature=1.0, seed=1,
                                       extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert picked.choices[0].text in ("red", "green", "blue")
    native = httpx.post(server.base_url + "/generate", headers=server.headers(), json={
        "text": "Answer:", "sampling_params": {"max_new_tokens": 8, "ebnf": 'root ::= "A" | "B"'}}).json()
    assert native["text"] in ("A", "B")
    with pytest.raises(openai.BadRequestError, match="regex cannot be followed"):
        client.completions.create(model="tiny-qwen3", prompt="x", max_tokens=4, extra_body={"regex": "(a"})


def test_tokenize_counts_what_the_engine_counts(client, server):
    def post(path, body):
        r = httpx.post(server.base_url + path, headers=server.headers(), json=body)
        assert r.status_code == 200, r.text
        return r.json()

    chat = client.chat.completions.create(model="tiny-qwen3", messages=CHAT, max_tokens=1)
    counted = post("/tokenize", {"messages": CHAT})
    assert counted["count"] == chat.usage.prompt_tokens == len(counted["tokens"])
    completion = client.completions.create(model="tiny-qwen3", prompt="The capital of France", max_tokens=1)
    counted = post("/tokenize", {"prompt": "The capital of France", "return_token_strs": True})
    assert counted["count"] == completion.usage.prompt_tokens and len(counted["token_strs"]) == counted["count"]
    assert post("/detokenize", {"tokens": counted["tokens"]})["prompt"] == "The capital of France"


def test_forced_tool_calls(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
                  "type": "object", "properties": {"unit": {"enum": ["C", "F"]}}, "required": ["unit"],
                  "additionalProperties": False}}},
             {"type": "function", "function": {"name": "get_time", "parameters": {
                  "type": "object", "properties": {}, "additionalProperties": False}}}]
    kw = dict(model="tiny-qwen3", messages=CHAT, max_tokens=128, temperature=0, tools=tools,
              extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    for choice, names, parallel in [("required", {"get_weather", "get_time"}, None),
                                    ("required", {"get_weather", "get_time"}, False),
                                    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}, None)]:
        extra = {} if parallel is None else {"parallel_tool_calls": parallel}
        r = client.chat.completions.create(tool_choice=choice, **extra, **kw)
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
        calls = r.choices[0].message.tool_calls
        assert calls and (len(calls) == 1 or parallel is not False)
        for call in calls:
            assert call.function.name in names
            arguments = json.loads(call.function.arguments)
            assert arguments == {} if call.function.name == "get_time" else arguments["unit"] in ("C", "F")


def test_stop_string_across_token_boundaries(client):
    base = client.completions.create(model="tiny-qwen3", prompt="hello", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    # A stop string made of the end of one output token and the start of the next.
    tokenizer_free_cut = len(base) // 2
    stop = base[tokenizer_free_cut - 2 : tokenizer_free_cut + 2]
    assert len(stop) == 4
    r = client.completions.create(model="tiny-qwen3", prompt="hello", max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-qwen3", prompt="hello", max_tokens=24, temperature=0, stop=[stop], stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == r.choices[0].text and stop not in streamed


def test_n_logprobs_and_seed(client):
    kw = dict(model="tiny-qwen3", messages=CHAT, max_tokens=6, temperature=1.0, seed=7, n=2,
              logprobs=True, top_logprobs=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    lp = a.choices[0].logprobs.content
    assert len(lp) == a.usage.completion_tokens // 2 or len(lp) >= 1
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in lp)
    comp = client.completions.create(model="tiny-qwen3", prompt="abc", max_tokens=4, temperature=0, logprobs=2)
    assert len(comp.choices[0].logprobs.tokens) == len(comp.choices[0].logprobs.token_logprobs)


def test_reasoning_parser_leaves_content_when_thinking_is_off(client):
    r = client.chat.completions.create(model="tiny-qwen3", messages=CHAT, max_tokens=8, temperature=0,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    msg = r.choices[0].message
    assert getattr(msg, "reasoning_content", None) in (None, "")
    assert msg.content is not None


def test_tools_reach_the_chat_template(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    plain = client.chat.completions.create(model="tiny-qwen3", messages=CHAT, max_tokens=2)
    with_tools = client.chat.completions.create(model="tiny-qwen3", messages=CHAT, max_tokens=2, tools=tools)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens
    history = CHAT + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = client.chat.completions.create(model="tiny-qwen3", messages=history, max_tokens=4, tools=tools)
    assert r.usage.prompt_tokens > with_tools.usage.prompt_tokens


def test_http_greedy_equals_offline_engine(client, model_dir):
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    r = client.completions.create(model="tiny-qwen3", prompt="the weather is", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    with Engine(model_path=str(model_dir), max_total_tokens=1024) as engine:
        offline = engine.generate("the weather is", params)
    assert r.choices[0].text == offline["text"]


def test_bad_input_gets_400_and_server_keeps_serving(server, client):
    cases = [
        (b"{not json", "application/json"),
        (json.dumps({"model": "tiny-qwen3", "messages": "hi"}).encode(), "application/json"),
        (json.dumps({"model": "tiny-qwen3", "messages": CHAT, "temperature": -1}).encode(), "application/json"),
        (json.dumps({"model": "tiny-qwen3", "messages": CHAT, "max_tokens": "many"}).encode(), "application/json"),
    ]
    for body, ctype in cases:
        r = server.post("/v1/chat/completions", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 400, r.text
        assert set(r.json()["error"]) >= {"message", "type"}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=2)
    # Too long for the context: OpenAI's code, which clients act on (trimming history, ...).
    with pytest.raises(openai.BadRequestError, match="context length") as too_long:
        client.completions.create(model="tiny-qwen3", prompt=[5] * 600, max_tokens=2)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="lower max_tokens") as too_many:
        client.chat.completions.create(model="tiny-qwen3", messages=CHAT, max_tokens=100000)
    assert too_many.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-qwen3", messages=CHAT, max_tokens=2, stream=True, top_p=0)
    assert client.chat.completions.create(model="tiny-qwen3", messages=CHAT, max_tokens=2).usage is not None


def test_logit_bias_steers_generation(model_dir, server, client):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    word = tok.encode(" weather", add_special_tokens=False)[0]
    # +100 makes the token certain, greedy or sampled, and the text is that token repeated.
    for temperature in (0.0, 1.0):
        r = client.completions.create(model="tiny-qwen3", prompt="It is", max_tokens=4, temperature=temperature,
                                      logit_bias={str(word): 100}, extra_body={"ignore_eos": True})
        assert r.choices[0].text == tok.decode([word] * 4)
    # -100 on the greedy choice bans it (the native API, which returns the ids; string keys as JSON has).
    def first_id(bias):
        body = {"text": "It is", "sampling_params": {"max_new_tokens": 1, "temperature": 0, "logit_bias": bias}}
        r = httpx.post(server.base_url + "/generate", json=body, headers=server.headers(), timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["output_ids"][0]

    greedy = first_id({})
    assert first_id({str(greedy): -100}) != greedy
    assert first_id({str(word): 100}) == word
    with pytest.raises(openai.BadRequestError, match="logit_bias token ids out of range"):
        client.completions.create(model="tiny-qwen3", prompt="It is", max_tokens=1, logit_bias={"99999999": 1})


async def _drop_streams(server, count: int) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers(), timeout=60) as http:
        async def one():
            body = {"model": "tiny-qwen3", "prompt": "go", "max_tokens": 400, "stream": True, "ignore_eos": True}
            async with http.stream("POST", "/v1/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        return  # leave after the first chunk: the connection closes mid-generation

        await asyncio.gather(*(one() for _ in range(count)))


def test_disconnected_streams_free_their_kv(server):
    asyncio.run(_drop_streams(server, 8))
    deadline = time.monotonic() + 30
    while True:
        info = server.get("/server_info").json()
        if info["running"] == 0 and info["queued"] == 0 and info["kv_used"] == info["kv_cached"]:
            break
        assert time.monotonic() < deadline, f"aborted requests still hold resources: {info}"
        time.sleep(0.2)


async def _flood(server, count: int):
    async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers(), timeout=120) as http:
        async def one():
            body = {"model": "tiny-qwen3", "prompt": "go", "max_tokens": 64, "ignore_eos": True}
            return (await http.post("/v1/completions", json=body)).status_code

        return await asyncio.gather(*(one() for _ in range(count)))


def test_overload_gets_503_and_the_rest_complete(server):
    codes = asyncio.run(_flood(server, 3 * (MAX_RUNNING + MAX_QUEUED)))
    assert set(codes) <= {200, 503}
    assert codes.count(503) > 0
    assert codes.count(200) >= MAX_RUNNING + MAX_QUEUED
    assert server.get("/health").status_code == 200


def test_metrics_exposition(server):
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("pymllm_requests_total", "pymllm_time_to_first_token_seconds", "pymllm_kv_cache_usage_ratio", "pymllm_num_requests_running"):
        assert name in text, name


def test_idle_kv_metrics_leave_out_the_prefix_cache(server):
    # A finished request's prefix stays cached (evictable); an idle server reports it as such,
    # not as slots in use.
    body = {"model": "tiny-qwen3", "prompt": "the prefix cache keeps this prompt", "max_tokens": 4}
    assert httpx.post(server.base_url + "/v1/completions", json=body, headers=server.headers(), timeout=60).status_code == 200
    deadline = time.monotonic() + 30
    while True:
        info = server.get("/server_info").json()
        if info["running"] == 0 and info["queued"] == 0:
            break
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    assert info["kv_evictable"] == info["kv_cached"] > 0
    text = httpx.get(server.base_url + "/metrics").text
    assert "pymllm_kv_cache_used_tokens 0.0" in text and "pymllm_kv_cache_usage_ratio 0.0" in text
    assert f"pymllm_kv_cache_evictable_tokens {float(info['kv_evictable'])}" in text


def test_idle_server_uses_no_cpu(server):
    def cpu_ticks(pid):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    pids = [server.proc.pid, *child_pids(server.proc.pid)]
    before = {p: cpu_ticks(p) for p in pids}
    time.sleep(2.0)
    used = sum(cpu_ticks(p) - before[p] for p in pids)
    assert used <= 10, f"idle server used {used} clock ticks in 2 s"


def test_worker_death_turns_health_503_and_exits(model_dir):
    srv = ServerProcess(["--server.model_path", str(model_dir), "--server.max_total_tokens", "512"])
    try:
        children = child_pids(srv.proc.pid)
        assert len(children) >= 3
        scheduler_pid = srv.get("/server_info").json()["pid"]
        import os
        import signal

        os.kill(scheduler_pid, signal.SIGKILL)
        srv.proc.wait(timeout=30)
        assert srv.proc.returncode != 0
        assert "worker process died" in srv.log_text()
        time.sleep(0.5)
        assert not any(pid_alive(p) for p in children), "orphaned worker processes"
    finally:
        srv.stop()


def test_sigterm_shuts_down_cleanly(model_dir):
    srv = ServerProcess(["--server.model_path", str(model_dir), "--server.max_total_tokens", "512",
                         "--server.log_level", "warning"])
    children = child_pids(srv.proc.pid)
    assert srv.stop() == 0
    assert " INFO " not in srv.log_text(), "--server.log_level warning must silence info logs"
    time.sleep(0.5)
    assert not any(pid_alive(p) for p in children), "orphaned worker processes"
