"""Greedy output and logits identical to transformers on the same tiny random weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pymllm.engine.forward_batch import ForwardMode
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.testing.tiny_models import tiny_model_dir
from pymllm.tests.helpers import greedy, make_scheduler, run_requests

PROMPTS = [
    [5, 17, 300, 42, 7, 99, 12, 250, 61, 8, 14, 71, 33],
    [11, 12, 13],
    [400, 2, 90, 91, 92, 93, 94, 95, 96],
    [7],
    [150, 151, 3, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 201, 202, 203, 204],
]
NEW_TOKENS = [12, 7, 10, 9, 6]

ARCHS = [("qwen3", True), ("qwen3", False), ("llama", True), ("qwen2", False)]


def hf_greedy(model_dir, prompts, new_tokens):
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for ids, n in zip(prompts, new_tokens):
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0, eos_token_id=None,
            )
            outs.append(out[0, len(ids):].tolist())
    return outs


@pytest.fixture(scope="module", params=ARCHS, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in ARCHS])
def model_and_reference(request):
    arch, tie = request.param
    model_dir = tiny_model_dir(arch, tie=tie)
    return model_dir, hf_greedy(model_dir, PROMPTS, NEW_TOKENS)


def _params():
    return [greedy(n, ignore_eos=True) for n in NEW_TOKENS]


def _outputs(reqs):
    return [reqs[str(i)].output_ids for i in range(len(PROMPTS))]


def test_batch_submitted_at_once(model_and_reference):
    model_dir, expected = model_and_reference
    sched = make_scheduler(model_dir, max_total_tokens=512)
    assert _outputs(run_requests(sched, PROMPTS, _params())) == expected


def test_staggered_arrivals(model_and_reference):
    model_dir, expected = model_and_reference
    sched = make_scheduler(model_dir, max_total_tokens=512, max_running_requests=3)
    reqs = run_requests(sched, PROMPTS, _params(), arrival_steps=[0, 2, 3, 7, 8])
    assert _outputs(reqs) == expected


def test_chunked_prefill(model_and_reference):
    model_dir, expected = model_and_reference
    sched = make_scheduler(model_dir, max_total_tokens=512, max_prefill_tokens=4)
    assert _outputs(run_requests(sched, PROMPTS, _params())) == expected


def test_retraction_under_kv_pressure(model_and_reference):
    model_dir, expected = model_and_reference
    # 40 slots cannot hold all five sequences at full length (about 110 tokens together).
    sched = make_scheduler(model_dir, max_total_tokens=40)
    reqs = run_requests(sched, PROMPTS, _params())
    assert sched.num_retractions > 0
    assert _outputs(reqs) == expected


@pytest.mark.parametrize("arch,tie", ARCHS)
def test_logits_match_transformers(arch, tie):
    model_dir = tiny_model_dir(arch, tie=tie)
    sched = make_scheduler(model_dir, max_total_tokens=256)
    runner = sched.runner
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    reqs = []
    for i, ids in enumerate(PROMPTS[:3]):
        req = Req(rid=str(i), origin_input_ids=ids, sampling_params=greedy(1), seed=0)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        reqs.append(req)
    lens = [len(p) for p in PROMPTS[:3]]
    slots = runner.token_to_kv_pool_allocator.alloc(sum(lens))
    batch = ScheduledBatch(ForwardMode.EXTEND, reqs, [0] * 3, lens, slots, [True] * 3)
    logits = runner.forward(runner.build_forward_batch(batch))
    with torch.no_grad():
        for i, ids in enumerate(PROMPTS[:3]):
            ref = ref_model(torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-4)
