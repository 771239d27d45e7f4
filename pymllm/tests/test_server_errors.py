"""Every failure is an OpenAI error object with the right status: 400, 401, 404, 503, 500."""

from __future__ import annotations

import json

import pytest

from pymllm.configs.server_config import ServerConfig
from pymllm.server import create_app
from pymllm.server.testing import FakeEngineClient, ScriptedReply, asgi_client

pytestmark = pytest.mark.anyio

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _assert_error(r, status, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


async def _post(fake, body, path="/v1/chat/completions", headers=None, **config):
    async with asgi_client(create_app(fake, ServerConfig(**config))) as client:
        if isinstance(body, (bytes, str)):
            headers = {"content-type": "application/json", **(headers or {})}
            return await client.post(path, content=body, headers=headers)
        return await client.post(path, json=body, headers=headers)


async def test_malformed_json_is_400():
    err = _assert_error(await _post(FakeEngineClient(), b"{not json"), 400)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "patch,param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -3}, "max_completion_tokens"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "data": "x"}]}]}, "messages"),
        ({"stop": ["a"] * 17}, None),
        ({"stream": "yes please"}, "stream"),
    ],
)
async def test_out_of_range_values_are_400(patch, param):
    fake = FakeEngineClient()
    err = _assert_error(await _post(fake, {"messages": USER, **patch}), 400)
    if param is not None:
        assert err["param"].startswith(param)
    assert fake.requests == []


@pytest.mark.parametrize(
    "sampling,needle",
    [
        # A float top_k once reached torch.topk in the scheduler and killed the engine.
        ({"top_k": 1.5}, "top_k must be an integer"),
        ({"top_logprobs": 2.5, "logprobs": True}, "top_logprobs must be an integer"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": "x"}, "max_new_tokens must be an integer"),
        ({"top_k": True}, "top_k must be an integer"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"stop": {"a": 1}}, "stop must be a string or a list"),
        ({"stop_token_ids": 5}, "stop_token_ids must be a list"),
        # A list here reached the tokenizer's decode in the detokenizer process and killed it.
        ({"skip_special_tokens": ["a"]}, "skip_special_tokens must be true or false"),
        ({"ignore_eos": "false"}, "ignore_eos must be true or false"),
    ],
)
async def test_native_sampling_params_of_the_wrong_type_are_400(sampling, needle):
    fake = FakeEngineClient()
    r = await _post(fake, {"text": "x", "sampling_params": sampling}, path="/generate")
    assert needle in _assert_error(r, 400)["message"]
    assert fake.requests == []


@pytest.mark.parametrize(
    "patch,needle",
    [
        ({"response_format": {"type": "json_schema"}}, "needs json_schema.schema"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
         "json_schema cannot be followed"),
        ({"top_logprobs": 3}, "top_logprobs requires logprobs"),
        ({"tool_choice": "required"}, "tool_choice requires tools"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "'g', which is not in tools"),
        # return_tensors once made the tokenizer process hand the scheduler an array, killing it.
        ({"chat_template_kwargs": {"return_tensors": "np", "tokenize": False}},
         "chat_template_kwargs cannot set return_tensors, tokenize"),
        ({"stream_options": {"include_usage": True}}, "stream_options is only allowed when stream is true"),
    ],
)
async def test_unsupported_options_are_400(patch, needle):
    err = _assert_error(await _post(FakeEngineClient(), {"messages": USER, **patch}), 400)
    assert needle in err["message"]
    assert not err["message"].startswith("body")  # a whole-body check's message stands on its own


async def test_response_format_text_is_accepted():
    r = await _post(FakeEngineClient(), {"messages": USER, "response_format": {"type": "text"}})
    assert r.status_code == 200


async def test_json_response_formats_become_the_engines_json_schema():
    fake = FakeEngineClient()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    await _post(fake, {"messages": USER, "response_format": {"type": "json_schema",
                                                             "json_schema": {"name": "answer", "schema": schema}}})
    await _post(fake, {"messages": USER, "response_format": {"type": "json_object"}})
    await _post(fake, {"messages": USER, "response_format": {"type": "text"}})
    await _post(fake, {"prompt": "x", "response_format": {"type": "json_object"}}, "/v1/completions")
    sent = [r.sampling_params.get("json_schema") for r in fake.requests]
    assert [json.loads(s) if s else None for s in sent] == [schema, {"type": "object"}, None, {"type": "object"}]


async def test_regex_ebnf_and_structured_outputs_become_the_engines_grammar():
    """SGLang's regex / ebnf and vLLM's structured_outputs (json, regex, choice, grammar) on both
    endpoints reach the engine as one grammar each."""
    fake = FakeEngineClient()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    bodies = [
        {"regex": "[0-9]{3}"},
        {"ebnf": 'root ::= "yes" | "no"'},
        {"structured_outputs": {"json": schema}},
        {"structured_outputs": {"json": json.dumps(schema)}},
        {"structured_outputs": {"regex": "a+"}},
        {"structured_outputs": {"choice": ['say "hi"', "naïve\\path"]}},
        {"structured_outputs": {"grammar": 'root ::= "x"'}},
    ]
    for body in bodies:
        assert (await _post(fake, {"messages": USER, **body})).status_code == 200
    assert (await _post(fake, {"prompt": "x", "regex": "b+"}, "/v1/completions")).status_code == 200
    grammar_keys = ("json_schema", "structural_tag", "regex", "ebnf")
    sent = [{k: v for k, v in r.sampling_params.items() if k in grammar_keys} for r in fake.requests]
    assert sent[:2] == [{"regex": "[0-9]{3}"}, {"ebnf": 'root ::= "yes" | "no"'}]
    assert json.loads(sent[2]["json_schema"]) == schema == json.loads(sent[3]["json_schema"])
    assert sent[4:] == [{"regex": "a+"}, {"ebnf": 'root ::= "say \\"hi\\"" | "naïve\\\\path"'},
                        {"ebnf": 'root ::= "x"'}, {"regex": "b+"}]


@pytest.mark.parametrize(
    "patch,needle,param",
    [
        ({"regex": "(unclosed"}, "regex cannot be followed: Regex parsing error", None),
        ({"ebnf": "root ::= "}, "ebnf cannot be followed: EBNF parser error", None),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "give one of regex, ebnf", None),
        ({"regex": "a", "response_format": {"type": "json_object"}}, "give one of response_format, regex", None),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one of json, regex, choice and grammar",
         "structured_outputs"),
        ({"structured_outputs": {}}, "exactly one of json, regex, choice and grammar, got none", "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "at least 1 item", "structured_outputs.choice"),
        ({"structured_outputs": {"choice": ["a", ""]}}, "choice must be a list of non-empty strings",
         "structured_outputs"),
        ({"structured_outputs": {"json": "{nope"}}, "json_schema is not valid JSON", None),
        ({"structured_outputs": {"whitespace": "x"}}, "Extra inputs are not permitted", "structured_outputs.whitespace"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required", "regex": "a"},
         "regex cannot constrain a reply that tool_choice makes a tool call", None),
    ],
)
async def test_bad_constraints_are_400(patch, needle, param):
    fake = FakeEngineClient()
    err = _assert_error(await _post(fake, {"messages": USER, **patch}), 400)
    assert needle in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    assert fake.requests == []


async def test_unknown_model_is_404():
    r = await _post(FakeEngineClient(), {"model": "gpt-9", "messages": USER})
    err = _assert_error(r, 404, "model_not_found")
    assert "gpt-9" in err["message"]
    for name in ("fake-model", "default"):
        assert (await _post(FakeEngineClient(), {"model": name, "messages": USER})).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_rejection_is_a_plain_400(stream):
    fake = FakeEngineClient(ScriptedReply(reject=(400, "prompt is 9000 tokens; the context is 4096")))
    r = await _post(fake, {"messages": USER, "stream": stream})
    err = _assert_error(r, 400)
    assert "9000 tokens" in err["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_queue_full_is_503(stream):
    fake = FakeEngineClient(ScriptedReply(queue_full=True))
    _assert_error(await _post(fake, {"messages": USER, "stream": stream}), 503, "queue_full")
    _assert_error(await _post(fake, {"prompt": "x", "stream": stream}, path="/v1/completions"), 503)
    _assert_error(await _post(fake, {"text": "x", "stream": stream}, path="/generate"), 503)


async def test_fan_out_past_the_queue_bound_is_400_not_503():
    # 4 running + 2 queued: a request of 8 generations could never be admitted, even idle.
    limits = {"max_running_requests": 4, "max_queued_requests": 2}
    fake = FakeEngineClient()
    err = _assert_error(await _post(fake, {"messages": USER, "n": 8}, **limits), 400)
    assert err["param"] == "n" and "at most 6" in err["message"]
    err = _assert_error(await _post(fake, {"prompt": ["a", "b"], "n": 4}, path="/v1/completions", **limits), 400)
    assert "needs 8 generations" in err["message"]
    assert fake.requests == []
    assert (await _post(fake, {"messages": USER, "n": 6}, **limits)).status_code == 200
    assert (await _post(fake, {"messages": USER, "n": 8}, max_running_requests=4)).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_dead_engine_is_503(stream):
    fake = FakeEngineClient()
    fake.healthy = False
    _assert_error(await _post(fake, {"messages": USER, "stream": stream}), 503, "engine_dead")
    async with asgi_client(create_app(fake, ServerConfig())) as client:
        _assert_error(await client.get("/server_info"), 503, "engine_dead")
        _assert_error(await client.post("/flush_cache"), 503, "engine_dead")
        assert (await client.get("/metrics")).status_code == 200


async def test_rejection_by_a_dying_engine_is_503():
    fake = FakeEngineClient(ScriptedReply(reject=(503, "scheduler failed: CUDA error")))
    err = _assert_error(await _post(fake, {"messages": USER}), 503)
    assert "CUDA error" in err["message"]


async def test_one_rejected_choice_aborts_the_others():
    fake = FakeEngineClient(
        lambda req: ScriptedReply(reject=(400, "bad")) if req.rid.endswith("-1")
        else ScriptedReply(chunks=["x"] * 50, delay_s=0.01)
    )
    _assert_error(await _post(fake, {"messages": USER, "n": 3}), 400)
    rid = fake.requests[0].rid.rsplit("-", 1)[0]
    assert sorted(fake.aborted) == [f"{rid}-0", f"{rid}-2"]


async def test_engine_exception_is_500_error_object():
    class Broken(FakeEngineClient):
        async def generate(self, req):
            raise RuntimeError("boom")
            yield  # pragma: no cover - makes this an async generator

    _assert_error(await _post(Broken(), {"messages": USER}), 500, "internal_error")


async def test_unknown_route_and_method_have_error_objects():
    async with asgi_client(create_app(FakeEngineClient(), ServerConfig())) as client:
        _assert_error(await client.get("/v1/nope"), 404)
        _assert_error(await client.get("/v1/chat/completions"), 405)


async def test_api_key():
    fake = FakeEngineClient()
    app = create_app(fake, ServerConfig(api_key="sekret"))
    async with asgi_client(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = await client.post("/v1/chat/completions", json={"messages": USER}, headers=headers)
            _assert_error(r, 401, "invalid_api_key")
        for path in ("/v1/models", "/server_info", "/v1/does-not-exist"):
            _assert_error(await client.get(path), 401)
        ok = await client.post(
            "/v1/chat/completions", json={"messages": USER}, headers={"Authorization": "Bearer sekret"}
        )
        assert ok.status_code == 200
        for path in ("/health", "/health_generate", "/metrics"):
            assert (await client.get(path)).status_code == 200, path
    assert len(fake.requests) == 2  # the authorised chat call and /health_generate
