"""Schema-driven fuzzing of the real server: random bodies never produce a 5xx or a hang. Random
keys alone are mostly refused before any value is used, so the known keys of /generate's
sampling_params and of chat_template_kwargs also get random values."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymllm.sampling_params import SamplingParams
from pymllm.testing.tiny_models import tiny_model_dir
from pymllm.tests.server_process import ServerProcess

ROUTES = ["/v1/chat/completions", "/v1/completions", "/generate", "/abort_request"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=12), st.sampled_from([0, 1, 2, -1, 0.5, 1.0, "default", "tiny", ""]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus"]),
     "content": st.one_of(st.text(max_size=20), json_values)}), max_size=3)


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(["--server.model_path", str(tiny_model_dir("qwen3")), "--server.max_total_tokens", "2048",
                         "--server.context_length", "128"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def schema_fields(server):
    spec = server.get("/openapi.json").json()
    components = spec["components"]["schemas"]
    fields = {}
    for route in ROUTES:
        ref = spec["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        fields[route] = sorted(components[ref.rsplit("/", 1)[1]]["properties"])
    return fields


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_bodies_never_fail_the_server(server, schema_fields, data):
    route = data.draw(st.sampled_from(ROUTES))
    keys = data.draw(st.lists(st.sampled_from(schema_fields[route]), unique=True, max_size=6))
    body = {}
    for key in keys:
        body[key] = data.draw(messages if key == "messages" else json_values)
    # Keep generations short so the fuzzing explores inputs, not decode time.
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and body[key] > 8:
            body[key] = 8
    if isinstance(body.get("sampling_params"), dict):
        body["sampling_params"]["max_new_tokens"] = 4
    if isinstance(body.get("n"), int) and body["n"] > 2:
        body["n"] = 2
    try:
        r = server.post(route, json=body, timeout=30)
    except httpx.TimeoutException:
        pytest.fail(f"{route} hung on {body!r}")
    assert r.status_code < 500, f"{route} {body!r} -> {r.status_code} {r.text}"
    if r.status_code >= 400:
        assert "error" in r.json()


SAMPLING_KEYS = sorted(field.name for field in dataclasses.fields(SamplingParams))
TEMPLATE_KEYS = ["enable_thinking", "add_generation_prompt", "tokenize", "return_tensors", "return_dict",
                 "chat_template", "tools", "padding", "truncation", "max_length", "custom_variable"]


def _post_expecting_no_server_error(server, route: str, body: dict) -> None:
    try:
        r = server.post(route, json=body, timeout=30)
    except httpx.TimeoutException:
        pytest.fail(f"{route} hung on {body!r}")
    assert r.status_code < 500, f"{route} {body!r} -> {r.status_code} {r.text}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_values_of_known_sampling_params_never_fail_the_server(server, data):
    keys = data.draw(st.lists(st.sampled_from(SAMPLING_KEYS), unique=True, min_size=1, max_size=4))
    params = {key: data.draw(json_values) for key in keys}
    tokens = params.get("max_new_tokens")
    if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 4:
        params["max_new_tokens"] = 4
    _post_expecting_no_server_error(server, "/generate", {"text": "hello", "sampling_params": params})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kwargs=st.dictionaries(st.sampled_from(TEMPLATE_KEYS), json_values, min_size=1, max_size=3))
def test_random_chat_template_kwargs_never_fail_the_server(server, kwargs):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "chat_template_kwargs": kwargs}
    _post_expecting_no_server_error(server, "/v1/chat/completions", body)


def test_server_still_healthy_after_fuzzing(server):
    assert server.get("/health").status_code == 200
    info = server.get("/server_info").json()
    assert info["running"] == 0 and info["kv_used"] == info["kv_cached"]
