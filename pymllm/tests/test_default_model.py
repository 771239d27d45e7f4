"""The embedded SmolLM2-135M-Instruct answers a real question, offline and over HTTP."""

from __future__ import annotations

import pytest

from pymllm.engine.launch import Engine
from pymllm.tests.server_process import ServerProcess

openai = pytest.importorskip("openai")  # a dev dependency, absent where only `pytest -m gpu` is set up

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def offline_answer():
    with Engine(max_total_tokens=2048) as engine:
        assert engine.client.model_name.startswith("SmolLM2-135M-Instruct")
        return engine.generate(messages=QUESTION, sampling_params={"max_new_tokens": 24, "temperature": 0})


def test_offline_engine_answers_paris(offline_answer):
    assert "Paris" in offline_answer["text"]
    assert offline_answer["meta_info"]["finish_reason"]["type"] in ("stop", "length")


def test_server_default_model_matches_offline(offline_answer):
    srv = ServerProcess(["--server.max_total_tokens", "2048"])
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=24, temperature=0)
        assert "Paris" in reply.choices[0].message.content
        assert reply.choices[0].message.content == offline_answer["text"]
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="default", messages=QUESTION, max_tokens=24, temperature=0, stream=True
            )
            if c.choices
        )
        assert streamed == offline_answer["text"]
    finally:
        srv.stop()
