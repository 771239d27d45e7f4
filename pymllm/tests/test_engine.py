"""The offline Engine: real worker processes, tiny model, greedy parity with the scheduler."""

from __future__ import annotations

import asyncio

import pytest

from pymllm.engine.io_struct import GenerateReqInput
from pymllm.engine.launch import Engine
from pymllm.testing.tiny_models import tiny_model_dir
from pymllm.tests.helpers import greedy, make_scheduler, run_requests


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_path=str(model_dir), max_total_tokens=1024, context_length=256) as e:
        yield e


def test_greedy_token_ids_match_in_process_scheduler(engine, model_dir):
    prompts = [[5, 6, 7, 8, 9], [100, 200, 300]]
    out = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 8, "temperature": 0, "ignore_eos": True})
    sched = make_scheduler(model_dir, max_total_tokens=1024)
    reqs = run_requests(sched, prompts, [greedy(8, ignore_eos=True)] * 2)
    assert [o["output_ids"] for o in out] == [reqs["0"].output_ids, reqs["1"].output_ids]
    assert out[0]["meta_info"]["prompt_tokens"] == 5
    assert out[0]["meta_info"]["completion_tokens"] == 8
    assert out[0]["meta_info"]["finish_reason"]["type"] == "length"


def test_text_prompt_and_text_output(engine):
    out = engine.generate("hello world", {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True})
    tokenizer = engine.client.tokenizer
    assert out["text"] == tokenizer.decode(out["output_ids"], skip_special_tokens=True)


def test_seeded_sampling_repeats(engine):
    params = {"max_new_tokens": 10, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    a = engine.generate("the number", params)
    b = engine.generate(["x y z", "the number"], [params, params])[1]
    assert a["output_ids"] == b["output_ids"]


def test_chat_messages_use_the_template(engine):
    out = engine.generate(messages=[{"role": "user", "content": "hi"}], sampling_params={"max_new_tokens": 3})
    expected = engine.client.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(expected, dict) or hasattr(expected, "input_ids"):
        expected = expected["input_ids"]
    assert out["meta_info"]["prompt_tokens"] == len(expected)


def test_logprobs_returned(engine):
    out = engine.generate("abc", {"max_new_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 2, "ignore_eos": True})
    assert len(out["logprobs"]) == 3
    text, logprob, top = out["logprobs"][0]
    assert logprob <= 0 and len(top) == 2 and top[0][1] >= top[1][1]


def test_prompt_logprobs_returned(engine):
    out = engine.generate("the number seven", {"max_new_tokens": 0, "prompt_logprobs": True, "top_logprobs": 1})
    scored = out["prompt_logprobs"]
    assert out["output_ids"] == [] and len(scored) == out["meta_info"]["prompt_tokens"]
    assert scored[0][1] is None and all(lp <= 0 and len(top) == 1 for _, lp, top in scored[1:])
    assert "".join(text for text, _, _ in scored) == "the number seven"


def test_bad_requests_raise_clear_errors(engine):
    with pytest.raises(ValueError, match="context length"):
        engine.generate(input_ids=[3] * 300, sampling_params={"max_new_tokens": 2})
    # Prompt plus the tokens asked for must fit the context (256 here): exactly full is allowed.
    with pytest.raises(ValueError, match=r"context length is 256 tokens, but 257 were requested"):
        engine.generate(input_ids=[3] * 200, sampling_params={"max_new_tokens": 57})
    assert engine.generate(input_ids=[3] * 200, sampling_params={"max_new_tokens": 56})["meta_info"]["prompt_tokens"] == 200
    with pytest.raises(ValueError, match="top_p"):
        engine.generate("x", {"top_p": 0})
    with pytest.raises(ValueError, match="logit_bias token ids out of range"):
        engine.generate("x", {"logit_bias": {"99999999": 1}})
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        engine.generate("x", {"temprature": 0.5})
    # The engine keeps serving afterwards.
    assert engine.generate("x", {"max_new_tokens": 1})["meta_info"]["completion_tokens"] == 1


# Token-id requests go from the frontend straight to the scheduler; their aborts must follow.
@pytest.mark.parametrize("prompt", [{"text": "go"}, {"input_ids": [5, 6, 7]}], ids=["text", "token_ids"])
def test_abandoned_stream_is_aborted_and_frees_kv(engine, prompt):
    async def scenario():
        req = GenerateReqInput(rid=f"abandon-me-{len(prompt)}-{next(iter(prompt))}", stream=True,
                               sampling_params={"max_new_tokens": 200, "ignore_eos": True}, **prompt)
        gen = engine.client.generate(req)
        await gen.__anext__()
        await gen.aclose()  # the consumer goes away mid-generation
        for _ in range(100):
            info = (await engine.client.control("server_info")).payload
            if info["running"] == 0 and info["kv_used"] == info["kv_cached"]:
                return info
            await asyncio.sleep(0.05)
        raise AssertionError(f"request still holds KV: {info}")

    loop = engine._ensure_loop()
    info = asyncio.run_coroutine_threadsafe(scenario(), loop).result(timeout=60)
    assert info["queued"] == 0
