"""Prefix caching in the real scheduler and model: same greedy output as without it, exact KV accounting.

Every scheduler here runs with check_invariants=True, so verify_kv_accounting holds after each step.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence

import pytest

from pymllm.configs import parse_config
from pymllm.mem_cache.base_prefix_cache import ChunkCache
from pymllm.mem_cache.radix_cache import RadixCache
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.scheduler import Scheduler
from pymllm.testing.tiny_models import tiny_model_dir
from pymllm.tests.helpers import greedy, make_scheduler, run_requests

_rng = random.Random(1234)


def _tokens(n: int, rng: random.Random = _rng) -> List[int]:
    # Ordinary vocabulary ids: the special tokens sit at the end of the tiny vocabulary.
    return [rng.randrange(3, 1000) for _ in range(n)]


SYSTEM = _tokens(40)  # a long shared system prompt
DOC = _tokens(23)
PROMPTS = [
    SYSTEM + _tokens(5),
    SYSTEM + _tokens(9),
    SYSTEM + DOC + _tokens(4),
    SYSTEM + DOC + _tokens(11),
    SYSTEM[:29] + _tokens(6),  # diverges inside the system prompt
    SYSTEM + DOC,  # a prefix of two earlier prompts
    _tokens(17),  # shares nothing
    SYSTEM + _tokens(5),
]
PROMPTS.append(PROMPTS[0])  # identical to an earlier prompt
PROMPTS.append(PROMPTS[2])
NEW_TOKENS = [6, 4, 8, 3, 5, 7, 4, 6, 6, 8]
# Two identical prompts arrive together (both miss, both insert); the rest trickle in later.
ARRIVALS = [0, 0, 9, 14, 14, 20, 22, 30, 30, 44]


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model_dir("qwen3", tie=True)


def run(
    sched: Scheduler,
    prompts: Sequence[List[int]],
    new_tokens: Sequence[int],
    arrivals: Optional[Sequence[int]] = None,
) -> Dict[str, Req]:
    """Submit each prompt at its step and step until all finished; run_requests checks that
    nothing leaked (every used slot belongs to the cache, none of it locked any more)."""
    return run_requests(sched, prompts, [greedy(n, ignore_eos=True) for n in new_tokens], arrivals, max_steps=5000)


def in_order(reqs: Dict[str, Req]) -> List[Req]:
    return [reqs[str(i)] for i in range(len(reqs))]


def outputs(reqs: Dict[str, Req]) -> List[List[int]]:
    return [r.output_ids for r in in_order(reqs)]


def reset_frees_everything(sched: Scheduler) -> None:
    sched.prefix_cache.reset()
    assert sched.allocator.available_size() == sched.allocator.size
    sched.verify_kv_accounting()


@pytest.fixture(scope="module")
def reference(model_dir) -> List[List[int]]:
    """Greedy outputs without prefix reuse and without any memory pressure."""
    sched = make_scheduler(model_dir, max_total_tokens=1024, disable_radix_cache=True)
    assert isinstance(sched.prefix_cache, ChunkCache)
    return outputs(run(sched, PROMPTS, NEW_TOKENS, ARRIVALS))


@pytest.mark.parametrize(
    "server",
    [
        {"max_total_tokens": 1024},
        # Chunks of 8 tokens: matched prefixes end in the middle of a chunked prefill.
        {"max_total_tokens": 1024, "max_prefill_tokens": 8},
        # Roughly two sequences fit: entries are evicted, and requests retracted, along the way.
        {"max_total_tokens": 160, "max_prefill_tokens": 16},
        # The same with the running requests' decode rows in the prefill batches.
        {"max_total_tokens": 160, "max_prefill_tokens": 16, "enable_mixed_batches": True},
    ],
    ids=["roomy", "chunked", "evicting", "evicting-mixed"],
)
def test_same_greedy_output_as_without_the_cache(model_dir, reference, server):
    sched = make_scheduler(model_dir, **server)
    assert isinstance(sched.prefix_cache, RadixCache)
    reqs = run(sched, PROMPTS, NEW_TOKENS, ARRIVALS)
    assert outputs(reqs) == reference
    stats = sched.stats()
    assert stats["cache_hit_tokens"] > 0 and 0.0 < stats["cache_hit_rate"] <= 1.0
    assert sum(r.cached_tokens for r in reqs.values()) == stats["num_cached_prompt_tokens"] > 0
    if server["max_total_tokens"] < 200:
        assert stats["cache_evicted_tokens"] > 0
        # Retraction hands a request's KV to the cache too (cache_finished_req). Mixed batches
        # reserve each running request's next slot up front, which avoided retraction here.
        assert sched.num_retractions > 0 or server.get("enable_mixed_batches")
    reset_frees_everything(sched)


def test_repeated_prompt_reports_cached_tokens(model_dir, reference):
    sched = make_scheduler(model_dir, max_total_tokens=1024)
    prompt = PROMPTS[2]
    first = run(sched, [prompt], [NEW_TOKENS[2]])["0"]
    assert first.cached_tokens == 0
    second = run(sched, [prompt], [NEW_TOKENS[2]])["0"]
    # Everything is cached, but the last prompt token is recomputed for its logits.
    assert second.cached_tokens == len(prompt) - 1
    assert first.output_ids == second.output_ids == reference[2]
    # A follow-up turn reuses the prompt and the generated tokens, whose KV the first request wrote.
    follow_up = prompt + first.output_ids[:-1] + [7, 8]
    third = run(sched, [follow_up], [4])["0"]
    assert third.cached_tokens == len(prompt) + len(first.output_ids) - 1
    plain = make_scheduler(model_dir, max_total_tokens=1024, disable_radix_cache=True)
    assert third.output_ids == run(plain, [follow_up], [4])["0"].output_ids
    reset_frees_everything(sched)


def test_long_stream_under_memory_pressure(model_dir):
    rng = random.Random(7)
    families = [_tokens(n, rng) for n in (30, 45, 20)]
    prompts, new_tokens, arrivals = [], [], []
    for i in range(60):
        if rng.random() < 0.7:
            head = rng.choice(families)
            prompt = head[: rng.randrange(len(head) // 2, len(head) + 1)] + _tokens(rng.randrange(1, 12), rng)
        else:
            prompt = _tokens(rng.randrange(5, 40), rng)
        prompts.append(prompt)
        new_tokens.append(rng.randrange(1, 6))
        arrivals.append(i + rng.randrange(3))
    # 128 slots hold about two of the shared heads at a time: entries are evicted all along.
    sched = make_scheduler(model_dir, max_total_tokens=128, max_prefill_tokens=24, max_running_requests=8)
    reqs = run(sched, prompts, new_tokens, arrivals)
    assert all(len(r.output_ids) == n for r, n in zip(in_order(reqs), new_tokens))
    stats = sched.stats()
    assert stats["cache_evicted_tokens"] > 0 and stats["num_cached_prompt_tokens"] > 0
    reset_frees_everything(sched)


def test_flag_selects_the_cache():
    assert parse_config([]).server.disable_radix_cache is False
    assert parse_config(["--server.disable_radix_cache"]).server.disable_radix_cache is True
