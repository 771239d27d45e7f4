"""Overlapped decoding in the Scheduler (``overlap=True``) with a fake runner: a decode step's
follower is launched before the step's tokens are read, and the outcome must be exactly the
synchronous scheduler's: the same tokens, finish reasons and freed KV, with the rows of requests
that finished in the meantime dropped. Oracle: the same scenario with ``overlap=False``."""

from __future__ import annotations

from typing import Dict, List

import pytest

from pymllm.engine.forward_batch import ForwardMode
from pymllm.engine.io_struct import TokenizedGenerateReq
from pymllm.orchestrator.schedule_batch import BatchResult, ScheduledBatch
from pymllm.orchestrator.scheduler import Scheduler
from pymllm.orchestrator.stop_checker import StopChecker
from pymllm.tests.test_scheduler import EOS, FakeRunner, _CharTokenizer, params


class LaunchingRunner(FakeRunner):
    """FakeRunner that also launches without waiting: the tokens are decided at launch (from
    positions, as FakeRunner does), a follower counting the token still in flight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.followers = 0
        self.launches = 0
        self.in_flight = 0

    def launch_batch(self, batch: ScheduledBatch, follows=None):
        if follows is not None:
            assert follows["batch"].mode.is_decode() and batch.mode.is_decode()
            assert [r.rid for r in batch.reqs] == [r.rid for r in follows["batch"].reqs]
            assert batch.prefix_lens == [p + 1 for p in follows["batch"].prefix_lens]
            assert self.in_flight == 1, "a follower is launched while exactly one step is in flight"
            self.followers += 1
        self.launches += 1
        self.batches.append(batch)
        ahead = 0 if follows is None else 1
        ids = []
        for req, p, n in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
            limit = self.eos_after.get(req.rid)
            produced = len(req.output_ids) + 1 + ahead
            ids.append(EOS if limit is not None and produced >= limit else 100 + p + n)
        self.in_flight += 1
        return {"batch": batch, "ids": ids}

    def collect(self, pending) -> BatchResult:
        self.in_flight -= 1
        return BatchResult(pending["ids"], [None] * len(pending["ids"]))

    def run_batch(self, batch: ScheduledBatch) -> BatchResult:
        assert self.in_flight == 0, "a synchronous batch never runs behind one in flight"
        return super().run_batch(batch)


def make(overlap: bool, kv_slots=64, max_running=4, prefill=16, context=64, tokenizer=None):
    runner = LaunchingRunner(kv_slots, context=context)
    sched = Scheduler(
        runner, max_running_requests=max_running, max_prefill_tokens=prefill, context_length=context,
        stop_checker=StopChecker([EOS], tokenizer), check_invariants=True, overlap=overlap,
    )
    return runner, sched


def run_scenario(overlap: bool, arrivals: Dict[int, List[tuple]], eos_after=None, aborts=None, **kw):
    """Submit (rid, prompt_len, params) at the given step numbers, abort rids at theirs, drain;
    returns the runner, the scheduler and {rid: (output_ids, finish type)}."""
    runner, sched = make(overlap, **kw)
    runner.eos_after.update(eos_after or {})
    reqs, step = {}, 0
    last = max(list(arrivals) + list((aborts or {}).keys()))
    while step <= last or sched.has_work():
        for rid, prompt_len, p in arrivals.get(step, []):
            reqs[rid] = sched.add_request(TokenizedGenerateReq(rid, list(range(10, 10 + prompt_len)), p))
        for rid in (aborts or {}).get(step, []):
            sched.abort(rid)
        sched.step()
        step += 1
        assert step < 1000
    assert sched.allocator.available_size() == sched.allocator.size
    assert sched.req_pool.available_size() == sched.req_pool.size
    assert runner.in_flight == 0
    return runner, sched, {rid: (r.output_ids, r.finish_reason.type) for rid, r in reqs.items()}


SCENARIOS = {
    "lengths": dict(arrivals={0: [("a", 5, params(n=12)), ("b", 7, params(n=3))], 4: [("c", 3, params(n=9))]}),
    "eos": dict(arrivals={0: [("a", 5, params(n=20)), ("b", 4, params(n=20))]}, eos_after={"a": 6, "b": 11}),
    "stop_string": dict(arrivals={0: [("s", 4, params(n=20, stop=["fgh"]))]}, tokenizer=_CharTokenizer()),
    "stop_token": dict(arrivals={0: [("t", 4, params(n=20, stop_token_ids=[100 + 4 + 7]))]}),
    "context": dict(arrivals={0: [("c", 8, params(n=100))]}, context=16),
    "retraction": dict(arrivals={0: [(str(i), 6, params(n=8)) for i in range(3)]}, kv_slots=24, prefill=64),
    "penalties": dict(arrivals={0: [("p", 4, params(n=9, repetition_penalty=1.3)), ("q", 4, params(n=6))]}),
    "queue": dict(arrivals={0: [(str(i), 4 + i, params(n=6 + 3 * i)) for i in range(5)]}, max_running=2,
                  eos_after={"1": 5}),
    "abort": dict(arrivals={0: [("a", 4, params(n=30)), ("b", 4, params(n=30))]}, aborts={5: ["a"], 9: ["b"]}),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_overlap_gives_the_synchronous_outcome(name):
    scenario = SCENARIOS[name]
    _, _, want = run_scenario(False, **scenario)
    _, _, got = run_scenario(True, **scenario)
    assert got == want


def test_long_decode_runs_launch_followers():
    runner, sched, out = run_scenario(True, {0: [("a", 5, params(n=40)), ("b", 5, params(n=40))]}, kv_slots=128)
    decodes = [b for b in runner.batches if b.mode == ForwardMode.DECODE]
    # Every decode step but the first (launched alone) follows the one before it; the last one
    # (whose tokens finish both requests) has no follower.
    assert runner.followers == len(decodes) - 1 == 38
    assert all(len(ids) == 40 and reason == "length" for ids, reason in out.values())


def test_a_request_finished_by_eos_drops_its_row_of_the_follower():
    runner, sched, out = run_scenario(True, {0: [("a", 5, params(n=30)), ("b", 5, params(n=30))]},
                                      eos_after={"a": 4})
    assert out["a"] == ([105, 106, 107, EOS], "stop")
    # The follower launched behind a's EOS step still held a; the step after it no longer does.
    holding_a = [b for b in runner.batches if b.mode == ForwardMode.DECODE and any(r.rid == "a" for r in b.reqs)]
    assert len(holding_a) == 4  # decode steps 2-4 of a, plus the follower whose row is dropped
    assert len(out["b"][0]) == 30


def test_waiting_requests_are_admitted_before_the_next_follower():
    runner, sched = make(True)
    sched.add_request(TokenizedGenerateReq("a", list(range(10, 15)), params(n=30)))
    for _ in range(4):
        sched.step()
    assert sched._in_flight is not None
    sched.add_request(TokenizedGenerateReq("b", list(range(10, 14)), params(n=5)))
    sched.step()  # collects the step in flight and launches no follower: b waits
    assert sched._in_flight is None
    sched.step()
    assert runner.batches[-1].mode == ForwardMode.EXTEND and runner.batches[-1].reqs[0].rid == "b"


def test_requests_waiting_for_a_running_place_do_not_stop_followers():
    """With every running place taken, a queued request cannot be admitted before one finishes,
    so the running requests keep launching followers; it is admitted once a place opens."""
    runner, sched = make(True, max_running=1, kv_slots=128)
    a = sched.add_request(TokenizedGenerateReq("a", list(range(10, 15)), params(n=20)))
    b = sched.add_request(TokenizedGenerateReq("b", list(range(10, 14)), params(n=5)))
    while sched.has_work():
        sched.step()
    assert runner.followers == 18 + 3  # a: decode steps 2..20, all but the first follow; b: 2..5
    assert len(a.output_ids) == 20 and len(b.output_ids) == 5
    first_b = next(i for i, batch in enumerate(runner.batches) if batch.reqs[0] is b)
    assert all(batch.reqs == [a] for batch in runner.batches[:first_b])


def test_no_follower_when_a_request_is_sure_to_finish():
    runner, sched = make(True)
    r = sched.add_request(TokenizedGenerateReq("a", list(range(10, 15)), params(n=3)))
    while sched.has_work():
        sched.step()
    assert len(r.output_ids) == 3 and runner.followers == 1  # token 3 ends it: nothing behind it


def test_overlap_needs_a_runner_that_launches():
    with pytest.raises(TypeError, match="launch_batch"):
        Scheduler(FakeRunner(16), max_running_requests=2, max_prefill_tokens=8, context_length=32,
                  stop_checker=StopChecker([EOS]), overlap=True)


def test_overlap_off_never_launches():
    runner, sched, _ = run_scenario(False, {0: [("a", 5, params(n=20))]})
    assert runner.followers == 0 and sched._in_flight is None
    assert runner.launches == 0 and len(runner.batches) == 20  # every batch ran through run_batch


# ---------------- the real ModelRunner (tiny Qwen3: eager on the CPU, CUDA graphs on a GPU) ----------------


def _runner_outcome(device: str, overlap: bool, prompts, params, arrivals=None):
    """(outputs, finish types, logprobs) per request and whether each launch followed another."""
    from pymllm.testing.tiny_models import tiny_model_dir
    from pymllm.tests.helpers import make_scheduler, run_requests

    server, dims = {"disable_overlap_schedule": not overlap}, {}
    if device == "cuda":
        server.update(device="cuda", dtype="bfloat16", attention_backend="flashinfer", max_total_tokens=1024,
                      max_running_requests=4)
        # FlashInfer's kernels need a head_dim of 64 or more.
        dims = dict(head_dim=128, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    sched = make_scheduler(tiny_model_dir("qwen3", **dims), **server)
    assert sched.overlap is overlap
    if device == "cuda":
        assert sched.runner.cuda_graph_runner is not None
    launched = []
    launch = sched.runner.launch_batch
    sched.runner.launch_batch = lambda b, follows=None: (launched.append(follows is not None), launch(b, follows))[1]
    reqs = run_requests(sched, prompts, params, arrival_steps=arrivals)
    return reqs, launched


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_overlap_with_the_model_runner_matches_the_synchronous_run(device):
    """Followers take their input tokens from the previous step's ids on the device (on a GPU:
    copied into the graphs' static inputs before the replay) and sample with the step counter
    one further; every output, logprob and finish must be the synchronous run's: greedy, seeded
    sampling with logprobs, penalties (counting the token in flight), and a request whose stop
    token arrives while its follower is in flight."""
    from pymllm.sampling_params import SamplingParams
    from pymllm.tests.helpers import greedy

    prompts = [[5, 9, 13, 2, 7], [3, 3, 8], [11, 4, 6, 1, 2, 9, 10], [7, 1]]

    def sampled(n=12, **kw):
        return SamplingParams(max_new_tokens=n, temperature=0.9, top_p=0.95, seed=17, **kw).with_defaults({})

    # Penalties count the token still in flight on the device (SamplingBatchInfo.in_flight_ids).
    params = [greedy(24), sampled(logprobs=True, top_logprobs=2),
              sampled(14, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
              greedy(16, repetition_penalty=10.0, frequency_penalty=2.0)]
    # On the GPU all arrive at once, so both runs batch alike step by step: bf16 kernels may
    # round a row differently at another batch size, and a tiny random model has near-ties.
    arrivals = [0, 0, 3, 5] if device == "cpu" else [0, 0, 0, 0]
    want, _ = _runner_outcome(device, False, prompts, params, arrivals)
    got, launched = _runner_outcome(device, True, prompts, params, arrivals)

    def outcome(reqs):
        return {rid: (r.output_ids, r.finish_reason.type) for rid, r in reqs.items()}

    assert outcome(got) == outcome(want)
    assert sum(launched) > 10, "followers were launched"
    # Logprobs agree to rounding: the two runs batch the requests differently at times (an
    # arrival lands one step later behind a follower), which changes the matmul shapes.
    tol = 1e-4 if device == "cpu" else 5e-2
    assert len(got["1"].logprobs) == len(want["1"].logprobs) == 12
    for (tok, lp, top), (want_tok, want_lp, want_top) in zip(got["1"].logprobs, want["1"].logprobs):
        assert tok == want_tok and lp == pytest.approx(want_lp, abs=tol)
        assert [t for t, _ in top] == [t for t, _ in want_top]
        assert [v for _, v in top] == pytest.approx([v for _, v in want_top], abs=tol)
    # Request 0 ending early at a stop token (a token of its synchronous run): its follower's
    # row is dropped and the other request goes on.
    stop = want["0"].output_ids[5]
    stop_params = [greedy(14, stop_token_ids=[stop]), greedy(14)]
    want_stop, _ = _runner_outcome(device, False, prompts[:2], stop_params)
    got_stop, _ = _runner_outcome(device, True, prompts[:2], stop_params)
    assert outcome(got_stop) == outcome(want_stop)
    assert want_stop["0"].finish_reason.type == "stop" and want_stop["0"].output_ids[-1] == stop


def test_a_followers_penalties_count_the_token_in_flight(monkeypatch):
    """The ModelRunner hands a follower's sampler the ids of the step it follows (still on the
    device) as in_flight_ids, which SamplingBatchInfo counts like appended tokens
    (test_sampler.test_in_flight_tokens_count_like_appended_ones)."""
    import torch

    from pymllm.executor import model_runner as runner_mod
    from pymllm.testing.tiny_models import tiny_model_dir
    from pymllm.tests.helpers import greedy, make_scheduler, run_requests

    sched = make_scheduler(tiny_model_dir("qwen3"))
    seen = []
    build = runner_mod.SamplingBatchInfo.from_params
    monkeypatch.setattr(runner_mod.SamplingBatchInfo, "from_params",
                        lambda *a, **k: (seen.append(k.get("in_flight_ids")), build(*a, **k))[1])
    launch = sched.runner.launch_batch
    followed = []
    sched.runner.launch_batch = lambda b, follows=None: (
        followed.append(None if follows is None else follows.device_ids.clone()), launch(b, follows))[1]
    run_requests(sched, [[5, 9, 13, 2, 7]], [greedy(8, frequency_penalty=1.0)])
    assert len(seen) == len(followed) == 8 and sum(f is not None for f in followed) == 6
    for flight, prev in zip(seen, followed):
        assert (flight is None) == (prev is None)
        if prev is not None:
            assert torch.equal(flight, prev)
