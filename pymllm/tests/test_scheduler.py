"""Scheduler policy with a fake runner: admission, chunking, retraction, abort, finishing."""

from __future__ import annotations

from typing import List

import pytest

from pymllm.engine.forward_batch import ForwardMode
from pymllm.engine.io_struct import TokenizedGenerateReq
from pymllm.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator
from pymllm.orchestrator.schedule_batch import BatchResult, ScheduledBatch
from pymllm.orchestrator.scheduler import RequestRejected, Scheduler
from pymllm.orchestrator.stop_checker import StopChecker
from pymllm.sampling_params import SamplingParams

EOS = 2


class FakeRunner:
    """Returns token 100 + position for every sequence; records the batches it ran."""

    def __init__(self, kv_slots: int, req_slots: int = 8, context: int = 64):
        self.req_to_token_pool = ReqToTokenPool(req_slots, context, "cpu")
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(kv_slots)
        self.batches: List[ScheduledBatch] = []
        self.eos_after = {}  # rid -> emit EOS once this many tokens were produced

    def run_batch(self, batch: ScheduledBatch) -> BatchResult:
        self.batches.append(batch)
        ids = []
        for req, p, n in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
            limit = self.eos_after.get(req.rid)
            ids.append(EOS if limit is not None and len(req.output_ids) + 1 >= limit else 100 + p + n)
        return BatchResult(ids, [None] * len(ids))


def make(kv_slots=64, max_running=4, prefill=16, context=64, tokenizer=None, mixed=False):
    runner = FakeRunner(kv_slots, context=context)
    sched = Scheduler(
        runner, max_running_requests=max_running, max_prefill_tokens=prefill, context_length=context,
        stop_checker=StopChecker([EOS], tokenizer), check_invariants=True, mixed=mixed,
    )
    return runner, sched


def params(n=4, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw).with_defaults({})


def submit(sched, rid, prompt_len, p=None):
    return sched.add_request(TokenizedGenerateReq(rid, list(range(10, 10 + prompt_len)), p or params()))


def drain(sched, limit=500):
    steps = 0
    while sched.has_work():
        sched.step()
        steps += 1
        assert steps < limit
    return steps


def test_runs_to_completion_and_frees_everything():
    runner, sched = make()
    reqs = [submit(sched, str(i), 5 + i) for i in range(6)]
    drain(sched)
    assert all(len(r.output_ids) == 4 and r.finish_reason.type == "length" for r in reqs)
    assert sched.allocator.available_size() == sched.allocator.size
    assert sched.req_pool.available_size() == sched.req_pool.size


def test_max_running_requests_bounds_every_batch():
    runner, sched = make(max_running=2)
    for i in range(5):
        submit(sched, str(i), 4)
    drain(sched)
    assert max(b.batch_size for b in runner.batches) <= 2


def test_long_prompt_is_chunked_not_stalled():
    runner, sched = make(prefill=8, kv_slots=128)
    req = submit(sched, "long", 30)
    drain(sched)
    extends = [b for b in runner.batches if b.mode == ForwardMode.EXTEND]
    assert [b.extend_lens[0] for b in extends] == [8, 8, 8, 6]
    assert [b.sample[0] for b in extends] == [False, False, False, True]
    assert len(req.output_ids) == 4


def test_decode_keeps_running_while_a_long_prompt_is_chunked():
    runner, sched = make(prefill=4, kv_slots=128)
    first = submit(sched, "a", 3, params(n=10))
    sched.step()  # prefill of "a"
    submit(sched, "b", 20)
    modes = []
    for _ in range(8):
        sched.step()
        modes.append(runner.batches[-1].mode)
    assert ForwardMode.DECODE in modes[:2], "decode must not wait for the whole chunked prompt"
    assert len(first.output_ids) > 1
    drain(sched)


def test_mixed_prefill_carries_the_running_requests_decode_rows():
    runner, sched = make(mixed=True)
    first = submit(sched, "a", 3, params(n=6))
    sched.step()  # prefill of "a" alone
    sched.step()  # its decode
    assert len(first.output_ids) == 2
    second = submit(sched, "b", 5)
    sched.step()
    batch = runner.batches[-1]
    assert batch.mode == ForwardMode.MIXED
    assert [r.rid for r in batch.reqs] == ["b", "a"]
    assert batch.prefix_lens == [0, first.kv_len - 1] and batch.extend_lens == [5, 1]
    assert batch.sample == [True, True] and len(batch.out_cache_loc) == 6
    # The prefill step gave "a" its next token (100 + its position) as a decode step would.
    assert len(first.output_ids) == 3 and first.output_ids[-1] == 100 + batch.prefix_lens[1] + 1
    assert len(second.output_ids) == 1
    drain(sched)
    assert len(first.output_ids) == 6 and len(second.output_ids) == 4
    assert sched.allocator.available_size() == sched.allocator.size


def test_without_mixing_a_prefill_holds_only_prompts():
    runner, sched = make(mixed=False)
    submit(sched, "a", 3, params(n=6))
    sched.step()
    sched.step()
    submit(sched, "b", 5)
    drain(sched)
    assert all(b.mode in (ForwardMode.EXTEND, ForwardMode.DECODE) for b in runner.batches)


def test_requests_with_images_are_not_decoded_in_a_prefill():
    """An image request decodes at its position plus its mrope delta, which only decode steps add."""
    runner, sched = make(mixed=True)
    first = submit(sched, "a", 3, params(n=6))
    sched.step()
    first.mm_inputs = object()
    submit(sched, "b", 5)
    sched.step()
    sched.step()
    assert all(b.mode != ForwardMode.MIXED for b in runner.batches)


def test_retraction_when_decode_runs_out_of_slots():
    runner, sched = make(kv_slots=24, prefill=64)
    reqs = [submit(sched, str(i), 6, params(n=8)) for i in range(3)]
    drain(sched)
    assert sched.num_retractions > 0
    assert all(len(r.output_ids) == 8 for r in reqs)
    # A retracted request recomputes prompt + generated tokens, so outputs stay consistent.
    assert sched.allocator.available_size() == sched.allocator.size


def test_prompt_longer_than_context_is_rejected():
    _, sched = make(context=16)
    with pytest.raises(RequestRejected, match="context length") as too_long:
        submit(sched, "x", 16)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(RequestRejected, match="empty") as empty:
        sched.add_request(TokenizedGenerateReq("e", [], params()))
    assert empty.value.code is None


def test_prompt_larger_than_kv_pool_is_rejected():
    _, sched = make(kv_slots=10, context=64)
    with pytest.raises(RequestRejected, match="KV cache"):
        submit(sched, "x", 12)


def test_abort_frees_slots_at_once():
    runner, sched = make()
    a = submit(sched, "a", 5, params(n=50))
    b = submit(sched, "b", 5, params(n=50))
    sched.step()
    sched.step()
    assert sched.allocator.used_size() > 0
    assert sched.abort("a") is a and a.finish_reason.type == "abort"
    assert sched.abort("missing") is None
    assert sched.allocator.used_size() == b.kv_len
    sched.abort("b")
    assert sched.allocator.available_size() == sched.allocator.size and not sched.has_work()


def test_abort_of_waiting_request():
    _, sched = make(max_running=1)
    submit(sched, "a", 3, params(n=20))
    w = submit(sched, "w", 3)
    sched.step()
    assert sched.abort("w") is w and w.finished


def test_eos_and_stop_token_ids_and_zero_tokens():
    runner, sched = make()
    runner.eos_after["e"] = 3
    e = submit(sched, "e", 4, params(n=10))
    s = submit(sched, "s", 4, params(n=10, stop_token_ids=[100 + 4 + 1 + 1]))
    z = submit(sched, "z", 4, params(n=0))
    drain(sched)
    assert e.output_ids[-1] == EOS and e.finish_reason.type == "stop" and len(e.output_ids) == 3
    assert s.finish_reason.type == "stop" and s.finish_reason.matched == s.output_ids[-1]
    assert z.finished and z.output_ids == []


def test_ignore_eos():
    runner, sched = make()
    runner.eos_after["e"] = 2
    e = submit(sched, "e", 4, params(n=5, ignore_eos=True))
    drain(sched)
    assert len(e.output_ids) == 5 and e.finish_reason.type == "length"


def test_context_limit_finishes_with_length():
    _, sched = make(context=12)
    r = submit(sched, "c", 8, params(n=100))
    drain(sched)
    assert r.prompt_len + len(r.output_ids) == 12 and r.finish_reason.type == "length"


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + (i % 26)) for i in ids)


def test_stop_string_across_tokens():
    runner, sched = make(tokenizer=_CharTokenizer())
    # Output token 100 + position maps to a letter: with a 4-token prompt, 104.. -> "abcdef..."
    r = submit(sched, "s", 4, params(n=20, stop=["def"]))
    drain(sched)
    assert r.finish_reason.type == "stop" and r.finish_reason.matched == "def"
    assert len(r.output_ids) == 6  # "d", "e", "f" are separate tokens: the match spans them
