"""The tokens a request gets do not depend on how it was scheduled.

One fixed workload on the real scheduler and model (tiny, CPU, float32) runs under combinations of
the scheduling features (prefix cache, overlapped decoding, chunked prefill, few running places,
a KV pool small enough to retract requests and evict cached prefixes, requests arriving all at
once or one by one, aborts of other requests) and must give each request exactly the tokens and
finish reason of the reference: one request at a time, a roomy pool, no cache, no overlap.
Greedy and seeded sampling are pure functions of a request's own logits. Those move by about
1e-6 with the batch around them (float32 reductions of other shapes), far below this workload's
smallest greedy top-2 gap (about 6e-3), so the comparison is exact: a wrong KV slot, position or
stale cached prefix changes tokens. Every scheduler checks its KV accounting after each step
(check_invariants=True).
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from pymllm.orchestrator.request import Req
from pymllm.orchestrator.scheduler import Scheduler
from pymllm.sampling_params import SamplingParams
from pymllm.testing.tiny_models import tiny_model_dir
from pymllm.tests.helpers import make_scheduler, run_requests

_rng = random.Random(2024)


def _tokens(n: int) -> List[int]:
    # Ordinary vocabulary ids: the special tokens sit at the end of the tiny vocabulary.
    return [_rng.randrange(3, 1000) for _ in range(n)]


SYSTEM = _tokens(70)
LONG = _tokens(150)
PROMPTS = [
    SYSTEM + _tokens(6),
    SYSTEM + _tokens(3),
    SYSTEM[:50] + _tokens(8),  # diverges inside the shared prefix
    LONG,  # longer than the small prefill budgets: chunked
    LONG[:90],  # a prefix of the one before
    _tokens(4),
    _tokens(12),
    SYSTEM + _tokens(6),
]
PROMPTS += [PROMPTS[0], PROMPTS[3]]  # identical to earlier prompts


def _params(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, **{"temperature": 0.0, **kw}).with_defaults({})


PARAMS = [
    _params(12, stop=["repli"]),
    _params(20, ignore_eos=True),
    _params(1),
    _params(8),
    _params(16, logprobs=True, top_logprobs=2),  # greedy through the Sampler
    _params(24, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.5),
    _params(18, temperature=0.9, top_p=0.9, seed=11),
    _params(20, ignore_eos=True),
    _params(12, stop_token_ids=[986]),
    _params(6, ignore_eos=True),
]
STAGGERED = [0, 0, 2, 3, 5, 8, 8, 13, 21, 21]

# The longest request needs 158 slots (150 prompt + 8 new); 200 hold it and little else, so
# requests are retracted and cached prefixes evicted.
CONFIGS = {
    "cache+overlap": dict(max_total_tokens=4096),
    "chunked": dict(max_total_tokens=4096, max_prefill_tokens=16),
    "retracting": dict(max_total_tokens=200, max_prefill_tokens=48),
    "retracting-sync-nocache": dict(max_total_tokens=200, disable_radix_cache=True, disable_overlap_schedule=True),
    "few-places": dict(max_total_tokens=300, max_running_requests=3, max_prefill_tokens=32),
    # Prefill batches that also carry the running requests' decode rows (--server.enable_mixed_batches).
    "mixed-chunked": dict(max_total_tokens=4096, max_prefill_tokens=16, enable_mixed_batches=True),
    "mixed-retracting": dict(max_total_tokens=200, max_prefill_tokens=48, enable_mixed_batches=True),
    "mixed-few-places": dict(max_total_tokens=300, max_running_requests=3, max_prefill_tokens=32,
                             enable_mixed_batches=True),
}


def run(sched: Scheduler, arrivals: Sequence[int], aborts: Optional[Dict[int, int]] = None) -> List[Req]:
    """Submit request i at step arrivals[i], abort it at step aborts[i], step until idle
    (run_requests checks that nothing is left holding a KV or request slot); then empty the cache."""
    reqs = run_requests(sched, PROMPTS, PARAMS, arrivals, max_steps=3000, aborts=aborts)
    sched.prefix_cache.reset()
    assert sched.allocator.used_size() == 0
    return [reqs[str(i)] for i in range(len(PROMPTS))]


def outcome(reqs: Sequence[Req]) -> List[Tuple[List[int], str]]:
    return [(r.output_ids, r.finish_reason.type) for r in reqs]


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="module")
def reference(model_dir) -> List[Tuple[List[int], str]]:
    sched = make_scheduler(model_dir, max_total_tokens=4096, max_running_requests=1,
                           disable_radix_cache=True, disable_overlap_schedule=True)
    out = outcome(run(sched, [0] * len(PROMPTS)))
    # The stop string and stop token of requests 0 and 8 are tokens of their reference output.
    assert out[0][1] == out[8][1] == "stop"
    return out


@pytest.mark.parametrize("arrival", ["together", "staggered"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_same_tokens_under_every_schedule(model_dir, reference, config, arrival):
    sched = make_scheduler(model_dir, **CONFIGS[config])
    reqs = run(sched, [0] * len(PROMPTS) if arrival == "together" else STAGGERED)
    assert outcome(reqs) == reference
    if "retracting" in config and arrival == "together":
        assert sched.num_retractions > 0, "the pool was meant to force retraction"


# Request -> the step it is aborted at, read off each configuration's schedule (with the earlier
# aborts applied) to catch a request in each state it can be aborted in.
ABORTS = {
    "retracting": {7: 46, 8: 47, 5: 47, 9: 63},  # retracted and waiting, chunked, decoding, in flight
    "few-places": {9: 21, 3: 28, 4: 32},  # waiting, retracted and waiting, in flight
    "chunked": {0: 5, 1: 5, 5: 30},  # decoding, chunked, in flight
    "mixed-chunked": {0: 5, 1: 5, 5: 30},  # the same states
    "mixed-retracting": {8: 40, 7: 46, 9: 60},  # waiting, retracted and chunked again, in flight
}


@pytest.mark.parametrize("config", list(ABORTS))
def test_aborts_leave_the_others_untouched(model_dir, reference, config):
    aborts = ABORTS[config]
    sched = make_scheduler(model_dir, **CONFIGS[config])
    reqs = run(sched, STAGGERED, aborts)
    for i, (req, (ids, reason)) in enumerate(zip(reqs, reference)):
        if i in aborts and req.finish_reason.type == "abort":
            assert req.output_ids == ids[: len(req.output_ids)]
        else:
            assert (req.output_ids, req.finish_reason.type) == (ids, reason)


def test_mixed_batches_flag(model_dir):
    from pymllm.configs import parse_config

    assert parse_config([]).server.enable_mixed_batches is False
    assert parse_config(["--server.enable_mixed_batches"]).server.enable_mixed_batches is True
    assert make_scheduler(model_dir, max_total_tokens=256).mixed is False
    assert make_scheduler(model_dir, max_total_tokens=256, enable_mixed_batches=True).mixed is True
