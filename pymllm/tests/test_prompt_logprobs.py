"""Prompt logprobs (SamplingParams.prompt_logprobs): which rows score the prompt, the chunked
scoring, and the scheduler's values against transformers' own log_softmax on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pymllm.engine.forward_batch import ForwardMode
from pymllm.engine.io_struct import TokenizedGenerateReq
from pymllm.executor.prompt_scoring import PromptScoring, plan_prompt_scoring, score_prompt_rows
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.orchestrator.scheduler_process import make_token_output
from pymllm.sampling_params import SamplingParams
from pymllm.testing.tiny_models import tiny_model_dir
from pymllm.tests.helpers import greedy, make_scheduler, run_requests

PROMPTS = [
    [5, 17, 300, 42, 7, 99, 12, 250, 61, 8, 14, 71, 33],
    [11, 12, 13],
    [150, 151, 3, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 201, 202, 203, 204],
    [7],
]
TOP = 3


def _req(prompt, scored=True, done=0):
    params = SamplingParams(max_new_tokens=4, prompt_logprobs=scored).with_defaults({})
    req = Req(rid="r", origin_input_ids=list(prompt), sampling_params=params, seed=0)
    req.prompt_logprobs = [(0, -1.0, [])] * done
    return req


def test_rows_to_score_follow_the_chunks():
    req = _req(range(10))
    # The logits at position p score token p + 1; position 9 (the last) picks the first new token.
    assert req.prompt_rows_to_score(0, 10) == (0, 9)
    assert req.prompt_rows_to_score(0, 4) == (0, 4)  # a first chunk: every row scores
    assert _req(range(10), done=4).prompt_rows_to_score(4, 6) == (0, 5)  # the last chunk
    # A retracted request recomputes its prompt: nothing scored twice.
    assert _req(range(10), done=9).prompt_rows_to_score(0, 12) == (9, 0)
    assert _req(range(10), scored=False).prompt_rows_to_score(0, 10) == (0, 0)
    assert _req([7]).prompt_rows_to_score(0, 1) == (0, 0)  # a one-token prompt has nothing to score
    assert _req(range(10)).prompt_logprobs_pending and not _req(range(10), done=9).prompt_logprobs_pending


def test_plan_lists_the_scoring_rows_and_their_targets():
    scored, plain = _req([10, 11, 12, 13, 14, 15]), _req([20, 21, 22], scored=False)
    batch = ScheduledBatch(ForwardMode.EXTEND, [plain, scored], prefix_lens=[0, 2], extend_lens=[3, 4],
                           out_cache_loc=np.arange(7), sample=[True, True])
    scored.prompt_logprobs = [(11, -1.0, []), (12, -1.0, [])]
    plan = plan_prompt_scoring(batch)
    # The scored request's rows are 3..6 of the batch (positions 2..5); position 5 is its last.
    assert plan.rows == [3, 4, 5] and plan.targets == [13, 14, 15] and plan.counts == [0, 3]
    decode = ScheduledBatch(ForwardMode.DECODE, [scored], [6], [1], np.arange(1), [True])
    assert plan_prompt_scoring(decode) is None


def test_chunked_scoring_equals_one_log_softmax():
    torch.manual_seed(0)
    weight = torch.randn(50, 16)
    hidden = torch.randn(7, 16)
    scoring = PromptScoring(rows=list(range(7)), targets=[3, 9, 0, 49, 7, 7, 21], counts=[2, 0, 5], top_k=[2, 0, 4])
    out = score_prompt_rows(lambda h: h @ weight.T, hidden, scoring, chunk_rows=3)
    reference = torch.log_softmax(hidden @ weight.T, dim=-1)
    assert [len(entries) for entries in out] == [2, 0, 5]
    flat = out[0] + out[2]
    # A 3-row matmul and a 7-row one may round differently (the CPU BLAS blocks them differently):
    # one float32 ulp of a logit is 2e-6 at 31, so the tolerance is relative to that rounding.
    close = dict(rel=4e-7, abs=1e-6)
    for r, (token, logprob, top) in enumerate(flat):
        assert token == scoring.targets[r]
        assert logprob == pytest.approx(reference[r, token].item(), **close)
        k = 2 if r < 2 else 4
        vals, ids = torch.topk(reference[r], k)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(vals.tolist(), **close)
    with pytest.raises(ValueError, match="hidden rows"):
        score_prompt_rows(lambda h: h @ weight.T, hidden[:3], scoring)


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="module")
def reference(model_dir):
    """transformers' log_softmax over each prompt: [position, vocab] per prompt."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([p])).logits[0].float(), dim=-1) for p in PROMPTS]


def _scored(max_new_tokens=3, **kw):
    return greedy(max_new_tokens, ignore_eos=True, prompt_logprobs=True, top_logprobs=TOP, **kw)


def _check_against_reference(req, prompt, ref):
    assert len(req.prompt_logprobs) == len(prompt) - 1
    for p, (token, logprob, top) in enumerate(req.prompt_logprobs):
        assert token == prompt[p + 1]
        assert logprob == pytest.approx(ref[p, token].item(), abs=2e-4)
        vals, ids = torch.topk(ref[p], TOP)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(vals.tolist(), abs=2e-4)


@pytest.mark.parametrize("max_prefill_tokens", [4096, 8], ids=["whole", "chunked"])
def test_prompt_logprobs_match_transformers(model_dir, reference, max_prefill_tokens):
    sched = make_scheduler(model_dir, max_total_tokens=1024, max_prefill_tokens=max_prefill_tokens)
    # A request that does not ask runs in the same batches and is not scored.
    prompts = PROMPTS + [PROMPTS[0]]
    params = [_scored()] * len(PROMPTS) + [greedy(3, ignore_eos=True)]
    reqs = run_requests(sched, prompts, params)
    for i, prompt in enumerate(PROMPTS):
        _check_against_reference(reqs[str(i)], prompt, reference[i])
        assert len(reqs[str(i)].output_ids) == 3
    assert reqs[str(len(PROMPTS))].prompt_logprobs == []
    # Scoring changes nothing about the tokens generated.
    assert reqs["4"].output_ids == reqs["0"].output_ids


def test_a_cached_prefix_is_scored_anyway(model_dir, reference):
    sched = make_scheduler(model_dir, max_total_tokens=1024)
    run_requests(sched, [PROMPTS[2]], [greedy(2)])
    reqs = run_requests(sched, [PROMPTS[2], PROMPTS[2]], [_scored(), greedy(2)])
    _check_against_reference(reqs["0"], PROMPTS[2], reference[2])
    # The request that does not score still reuses the cached prompt.
    assert reqs["1"].cached_tokens == len(PROMPTS[2]) - 1 and reqs["0"].cached_tokens == 0


def test_zero_new_tokens_only_scores_the_prompt(model_dir, reference):
    sched = make_scheduler(model_dir, max_total_tokens=1024)
    reqs = run_requests(sched, [PROMPTS[0], PROMPTS[0]], [_scored(0), greedy(0)])
    scored, plain = reqs["0"], reqs["1"]
    assert scored.output_ids == [] and scored.finish_reason.type == "length"
    _check_against_reference(scored, PROMPTS[0], reference[0])
    assert plain.output_ids == [] and plain.prompt_logprobs == []


def test_the_scored_prompt_is_reported_once_with_its_first_token(model_dir):
    sched = make_scheduler(model_dir, max_total_tokens=1024, max_prefill_tokens=8)
    req = sched.add_request(TokenizedGenerateReq("a", PROMPTS[2], _scored(4)))
    reports = []
    while sched.has_work():
        touched = sched.step()
        if touched:
            reports.append(make_token_output(touched).prompt_logprobs[0])
    # Three chunks, then decode steps: the scores come with the first report, and only then.
    first, *later = reports
    assert first[0] == (PROMPTS[2][0], None, []) and first[1:] == req.prompt_logprobs
    assert len(first) == len(PROMPTS[2]) and all(r is None for r in later) and len(later) == 3


def test_an_aborted_request_reports_no_partial_scores(model_dir):
    sched = make_scheduler(model_dir, max_total_tokens=1024, max_prefill_tokens=8)
    req = sched.add_request(TokenizedGenerateReq("a", PROMPTS[2], _scored(4)))
    sched.step()  # the first chunk: 8 of 19 positions scored
    assert 0 < len(req.prompt_logprobs) < len(PROMPTS[2]) - 1
    sched.abort("a")
    assert make_token_output([req]).prompt_logprobs == [None]


def test_prompt_logprobs_must_be_a_bool():
    with pytest.raises(ValueError, match="prompt_logprobs must be true or false"):
        SamplingParams.from_dict({"prompt_logprobs": 1})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prompt_logprobs_on_the_gpu_fast_path():
    """bf16 with FlashInfer and CUDA graphs: a short prompt (which would otherwise replay a decode
    graph as rows) and a chunked one are scored eagerly, close to transformers' float32 values."""
    pytest.importorskip("flashinfer")
    # FlashInfer's SM90 prefill needs a head_dim of 64, 128 or 256.
    gpu_model = tiny_model_dir("qwen3", head_dim=128, hidden_size=256, intermediate_size=512,
                               num_attention_heads=4, num_key_value_heads=2)
    sched = make_scheduler(gpu_model, device="cuda", dtype="bfloat16", attention_backend="flashinfer",
                           max_total_tokens=1024, max_prefill_tokens=8)
    assert sched.runner.cuda_graph_runner is not None
    reqs = run_requests(sched, PROMPTS, [_scored()] * len(PROMPTS))
    model = AutoModelForCausalLM.from_pretrained(gpu_model, torch_dtype=torch.float32).eval()
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1)
        req = reqs[str(i)]
        assert [t for t, _, _ in req.prompt_logprobs] == prompt[1:]
        got = torch.tensor([lp for _, lp, _ in req.prompt_logprobs])
        want = torch.tensor([ref[p, t].item() for p, t in enumerate(prompt[1:])])
        assert torch.allclose(got, want, atol=0.05, rtol=0.02), (got, want)


# ---------------------------------------------------------------- reusing the scores of a shared prefix
CONTEXT = [150, 151, 3, 77, 78, 79, 80, 81, 82, 83, 84, 85]


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


def _reference_of(hf_model, prompt):
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)


def test_scores_of_a_shared_prefix_are_reused(model_dir, hf_model):
    """Multiple-choice scoring: one context, several continuations. After the first, each takes the
    context's scores from the score cache and its KV from the prefix cache, and every score still
    equals transformers' log_softmax on its own prompt."""
    sched = make_scheduler(model_dir, max_total_tokens=1024)
    choices = [CONTEXT + [201, 202], CONTEXT + [5, 6, 7], CONTEXT + [201, 9]]
    reqs = run_requests(sched, choices, [_scored(0)] * 3, arrival_steps=[0, 1, 2])
    for i, prompt in enumerate(choices):
        _check_against_reference(reqs[str(i)], prompt, _reference_of(hf_model, prompt))
    assert reqs["0"].cached_tokens == 0
    # The context's len - 1 scores are reused, so its positions but the last come from the cache;
    # the third shares one more token with the first.
    assert reqs["1"].cached_tokens == len(CONTEXT) - 1 and reqs["2"].cached_tokens == len(CONTEXT)
    assert sched.stats()["num_reused_prompt_scores"] == (len(CONTEXT) - 1) + len(CONTEXT)


def test_scores_with_fewer_alternatives_are_not_reused(model_dir, hf_model):
    sched = make_scheduler(model_dir, max_total_tokens=1024)
    few = greedy(0, prompt_logprobs=True, top_logprobs=1)
    reqs = run_requests(sched, [CONTEXT + [201], CONTEXT + [202]], [few, _scored(0)], arrival_steps=[0, 1])
    assert reqs["1"].cached_tokens == 0  # it asks for 3 alternatives, the cached scores have 1
    _check_against_reference(reqs["1"], CONTEXT + [202], _reference_of(hf_model, CONTEXT + [202]))
    # The reverse direction reuses them, trimmed to the alternatives asked for.
    again = run_requests(sched, [CONTEXT + [203]], [few])["0"]
    assert again.cached_tokens == len(CONTEXT) - 1 and all(len(top) == 1 for _, _, top in again.prompt_logprobs)


def test_continuations_arriving_together_compute_their_context_once(model_dir, hf_model):
    """A scoring request whose prompt shares MIN_SHARED_SCORES or more unscored positions with one
    already in the batch waits for the next batch and reuses them; a shorter share does not wait."""
    from pymllm.orchestrator.prompt_scores import MIN_SHARED_SCORES

    long_context = [(7 * i + 3) % 500 + 5 for i in range(MIN_SHARED_SCORES + 9)]
    sched = make_scheduler(model_dir, max_total_tokens=1024)
    prompts = [long_context + [201], long_context + [202, 203], [11, 12, 13, 14]]
    reqs = run_requests(sched, prompts, [_scored(0), _scored(0), greedy(2)])
    for i in range(2):
        _check_against_reference(reqs[str(i)], prompts[i], _reference_of(hf_model, prompts[i]))
    assert reqs["1"].cached_tokens == len(long_context) - 1
    # CONTEXT (12 tokens) shares too little to wait for: both are computed in the first batch.
    sched = make_scheduler(model_dir, max_total_tokens=1024)
    reqs = run_requests(sched, [CONTEXT + [201], CONTEXT + [202]], [_scored(0), _scored(0)])
    assert reqs["0"].cached_tokens == reqs["1"].cached_tokens == 0


def test_flushing_the_caches_forgets_the_scores_too(model_dir):
    sched = make_scheduler(model_dir, max_total_tokens=1024)
    run_requests(sched, [CONTEXT + [201]], [_scored(0)])
    sched.flush_caches()
    assert len(sched.prompt_scores) == 0 and sched.prefix_cache.total_cached() == 0
    again = run_requests(sched, [CONTEXT + [202]], [_scored(0)])["0"]
    assert again.cached_tokens == 0 and sched.stats()["num_reused_prompt_scores"] == 0


def test_no_score_cache_without_the_radix_cache(model_dir):
    assert make_scheduler(model_dir, max_total_tokens=256).prompt_scores is not None
    assert make_scheduler(model_dir, max_total_tokens=256, disable_radix_cache=True).prompt_scores is None


def test_the_score_cache_keys_bound_and_trim():
    from pymllm.mem_cache.prompt_score_cache import PromptScoreCache, entry_bytes, prefix_keys, shared_prefix

    keys = prefix_keys([1, 2, 3, 4])
    assert len(set(keys)) == 4 and prefix_keys([1, 2, 9, 4])[:2] == keys[:2] and prefix_keys([1, 2, 9, 4])[2:] != keys[2:]
    assert shared_prefix(keys, prefix_keys([1, 2, 9, 4])) == 2 and shared_prefix(keys, keys[:3]) == 3
    assert shared_prefix(keys, prefix_keys([5])) == 0
    cache = PromptScoreCache(max_bytes=3 * entry_bytes(2))
    entries = [(2, -1.0, [(7, -0.1), (2, -1.0)]), (3, -2.0, [(3, -2.0), (8, -3.0)]), (4, -0.5, [(4, -0.5), (1, -2.0)])]
    cache.insert(keys, 0, entries, top_k=2)
    assert cache.lookup(keys, 2) == entries
    assert cache.lookup(keys, 1) == [(t, lp, top[:1]) for t, lp, top in entries]
    assert cache.lookup(keys, 3) == []  # more alternatives than were kept
    assert cache.lookup(prefix_keys([1, 2, 9, 4]), 2) == entries[:1]  # up to where the prompts part
    assert cache.bytes == 3 * entry_bytes(2)
    cache.insert(prefix_keys([5, 6]), 0, [(6, -1.0, [])], top_k=0)  # over the budget: the oldest used goes
    assert len(cache) == 3 and cache.bytes == 2 * entry_bytes(2) + entry_bytes(0)
    # Entry 1 (token 3) was the least recently used (entry 0 was read last), so the prompt's run stops there.
    assert cache.lookup(keys, 2) == entries[:1]
    cache.reset()
    assert len(cache) == 0 and cache.bytes == 0 and cache.lookup(keys, 0) == []
    with pytest.raises(ValueError, match="max_bytes"):
        PromptScoreCache(10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reused_scores_on_the_gpu_fast_path():
    """bf16, FlashInfer, CUDA graphs: continuations of one context after the first reuse its scores
    and KV (the last continuation's whole prompt but one token), within bf16 of transformers."""
    pytest.importorskip("flashinfer")
    gpu_model = tiny_model_dir("qwen3", head_dim=128, hidden_size=256, intermediate_size=512,
                               num_attention_heads=4, num_key_value_heads=2)
    sched = make_scheduler(gpu_model, device="cuda", dtype="bfloat16", attention_backend="flashinfer",
                           max_total_tokens=1024)
    choices = [CONTEXT + [201, 202], CONTEXT + [5, 6, 7], CONTEXT + [201, 202, 9]]
    reqs = run_requests(sched, choices, [_scored(2)] * 3, arrival_steps=[0, 4, 8])
    model = AutoModelForCausalLM.from_pretrained(gpu_model, torch_dtype=torch.float32).eval()
    for i, prompt in enumerate(choices):
        ref = _reference_of(model, prompt)
        got = torch.tensor([lp for _, lp, _ in reqs[str(i)].prompt_logprobs])
        want = torch.tensor([ref[p, t].item() for p, t in enumerate(prompt[1:])])
        assert torch.allclose(got, want, atol=0.05, rtol=0.02), (i, got, want)
    assert reqs["1"].cached_tokens == len(CONTEXT) - 1 and reqs["2"].cached_tokens == len(CONTEXT) + 1
