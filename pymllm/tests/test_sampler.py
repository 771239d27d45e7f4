"""Sampler tests against a per-row float64 reference written independently of the sampler."""

from __future__ import annotations

from collections import Counter
from typing import List, Optional, Sequence

import pytest
import torch

import pymllm.layers.sampler as sampler_mod
from pymllm.layers.sampler import (
    Sampler,
    SamplingBatchInfo,
    apply_penalties,
    hash_uniform,
)
from pymllm.sampling_params import SamplingParams

VOCAB = 48
TRIALS = 20000


def make_params(**kw) -> SamplingParams:
    return SamplingParams(**kw).with_defaults()


def make_info(
    params: Sequence[SamplingParams],
    seeds: Optional[Sequence[int]] = None,
    steps: Optional[Sequence[int]] = None,
    vocab: int = VOCAB,
    prompt_ids: Optional[List[List[int]]] = None,
    output_ids: Optional[List[List[int]]] = None,
) -> SamplingBatchInfo:
    n = len(params)
    return SamplingBatchInfo.from_params(
        list(params),
        seeds=list(seeds) if seeds is not None else [7] * n,
        steps=list(steps) if steps is not None else [0] * n,
        vocab_size=vocab,
        device="cpu",
        prompt_ids=prompt_ids,
        output_ids=output_ids,
    )


def fixed_logits(rows: int, vocab: int = VOCAB, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale


# ---- reference -------------------------------------------------------------------------------


def ref_penalise(row: List[float], p: SamplingParams, prompt: List[int], output: List[int]) -> List[float]:
    out = list(row)
    seen = set(prompt) | set(output)
    counts = Counter(output)
    for tok in range(len(out)):
        if tok in seen:
            out[tok] = out[tok] / p.repetition_penalty if out[tok] > 0 else out[tok] * p.repetition_penalty
        out[tok] -= p.frequency_penalty * counts[tok]
        if counts[tok] > 0:
            out[tok] -= p.presence_penalty
    return out


def ref_distribution(row: List[float], p: SamplingParams) -> List[float]:
    """Probabilities after temperature, top-k, top-p, min-p, each on the renormalised survivors."""
    z = torch.tensor(row, dtype=torch.float64) / p.temperature
    probs = torch.softmax(z, dim=0).tolist()
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    keep = set(order[: p.top_k] if p.top_k > 0 else order)

    def renorm(kept: set) -> List[float]:
        total = sum(probs[t] for t in kept)
        return [probs[t] / total if t in kept else 0.0 for t in range(len(probs))]

    cur = renorm(keep)
    if p.top_p < 1.0:
        kept, mass = set(), 0.0
        for tok in sorted(keep, key=lambda t: -cur[t]):
            kept.add(tok)
            mass += cur[tok]
            if mass >= p.top_p:
                break
        keep = kept
        cur = renorm(keep)
    if p.min_p > 0.0:
        top = max(cur)
        keep = {t for t in keep if cur[t] >= p.min_p * top}
        cur = renorm(keep)
    return cur


def empirical(tokens: torch.Tensor, vocab: int) -> List[float]:
    hist = torch.bincount(tokens, minlength=vocab).double()
    return (hist / hist.sum()).tolist()


def tv_distance(a: List[float], b: List[float]) -> float:
    return 0.5 * sum(abs(x - y) for x, y in zip(a, b))


def sample_many(row: torch.Tensor, p: SamplingParams, **info_kw) -> torch.Tensor:
    """Draw TRIALS samples of one request by batching it at successive steps."""
    info = make_info([p] * TRIALS, seeds=[1234] * TRIALS, steps=range(TRIALS), vocab=row.numel(), **info_kw)
    return Sampler()(row.unsqueeze(0).expand(TRIALS, -1), info).next_token_ids


# ---- greedy ----------------------------------------------------------------------------------


def test_greedy_equals_argmax() -> None:
    logits = fixed_logits(8)
    out = Sampler()(logits, make_info([make_params(temperature=0.0)] * 8))
    assert torch.equal(out.next_token_ids, torch.argmax(logits, dim=-1))
    assert out.next_token_ids.dtype == torch.int64
    assert out.logprobs is None and out.top_logprob_ids is None


def test_top_k_one_is_greedy_in_mixed_batch() -> None:
    logits = fixed_logits(6, scale=0.3)  # flat enough that a real sample would often differ
    params = [make_params(temperature=1.0, top_k=1), make_params(temperature=1.5),
              make_params(temperature=0.0), make_params(temperature=1.0, top_p=0.9)] + [
        make_params(temperature=1.0, top_k=1)] * 2
    for step in range(20):
        info = make_info(params, seeds=range(6), steps=[step] * 6)
        assert not info.is_all_greedy
        ids = Sampler()(logits, info).next_token_ids
        argmax = torch.argmax(logits, dim=-1)
        for row in (0, 2, 4, 5):
            assert ids[row] == argmax[row]


def test_half_precision_logits() -> None:
    logits = fixed_logits(4).to(torch.bfloat16)
    out = Sampler()(logits, make_info([make_params(temperature=0.0, logprobs=True)] * 4))
    assert torch.equal(out.next_token_ids, torch.argmax(logits.float(), dim=-1))
    assert out.logprobs.dtype == torch.float32


def test_all_greedy_fast_path_builds_no_penalty_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    info = make_info([make_params(temperature=0.0), make_params(top_k=1)],
                     prompt_ids=[[1, 2], [3]], output_ids=[[4], [5, 5]])
    assert info.is_all_greedy
    assert info.token_counts is None and info.seen_mask is None and not info.need_penalties

    def no_noise(*args, **kwargs):
        raise AssertionError("all-greedy batch must not draw sampling noise")

    monkeypatch.setattr(sampler_mod, "_gumbel_noise", no_noise)
    logits = fixed_logits(2)
    assert torch.equal(Sampler()(logits, info).next_token_ids, torch.argmax(logits, dim=-1))
    with pytest.raises(AssertionError, match="must not draw"):
        Sampler()(logits, make_info([make_params(temperature=1.0)] * 2))


def test_greedy_with_penalties_uses_penalised_argmax() -> None:
    logits = fixed_logits(3)
    top = torch.argmax(logits, dim=-1).tolist()
    params = [make_params(temperature=0.0, repetition_penalty=5.0),
              make_params(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0),
              make_params(temperature=0.0)]
    info = make_info(params, prompt_ids=[[top[0]], [], []], output_ids=[[], [top[1]] * 3, [top[2]]])
    out = Sampler()(logits, info).next_token_ids
    assert torch.equal(out, torch.argmax(apply_penalties(logits, info), dim=-1))
    assert out[0] != top[0] and out[1] != top[1] and out[2] == top[2]


# ---- determinism -----------------------------------------------------------------------------


def test_seeded_sampling_repeats() -> None:
    logits = fixed_logits(5, scale=0.5)
    params = [make_params(temperature=1.0, top_p=0.95)] * 5
    info = make_info(params, seeds=[11, 12, 13, 14, 15], steps=[3] * 5)
    first = Sampler()(logits, info).next_token_ids
    again = Sampler()(logits.clone(), make_info(params, seeds=[11, 12, 13, 14, 15], steps=[3] * 5))
    assert torch.equal(first, again.next_token_ids)


def test_seed_independent_of_batch_composition() -> None:
    logits = fixed_logits(6, scale=0.5)
    target = make_params(temperature=0.9, top_k=30)
    row = logits[2:3]
    for step in range(25):
        alone = Sampler()(row, make_info([target], seeds=[4242], steps=[step])).next_token_ids[0]
        companions = [make_params(temperature=0.0), make_params(temperature=1.2, top_p=0.7, min_p=0.05),
                      make_params(repetition_penalty=1.3, presence_penalty=0.5), make_params(top_k=5)]
        for pos in (0, 2, 4):
            params = companions[:pos] + [target] + companions[pos:]
            seeds = [9, 10, 11, 12][:pos] + [4242] + [9, 10, 11, 12][pos:]
            steps = [0, 40, 7, 2][:pos] + [step] + [0, 40, 7, 2][pos:]
            batch = torch.cat([logits[:pos], row, logits[pos:4]])
            info = make_info(params, seeds=seeds, steps=steps, prompt_ids=[[1, 2]] * 5, output_ids=[[3]] * 5)
            assert Sampler()(batch, info).next_token_ids[pos] == alone


def test_different_seeds_give_different_samples() -> None:
    logits = torch.zeros(1, VOCAB)
    n = 400
    info = make_info([make_params(temperature=1.0)] * n, seeds=range(n), steps=[0] * n)
    ids = Sampler()(logits.expand(n, -1), info).next_token_ids
    assert len(set(ids.tolist())) > VOCAB * 0.8
    # Consecutive steps of one seed are not stuck either.
    steps = Sampler()(logits.expand(n, -1), make_info([make_params()] * n, seeds=[5] * n, steps=range(n)))
    assert len(set(steps.next_token_ids.tolist())) > VOCAB * 0.8


def test_hash_uniform_properties() -> None:
    seeds = torch.tensor([0, -1, 2**62, 99], dtype=torch.int64)
    steps = torch.tensor([0, 1, 2, 3], dtype=torch.int64)
    vocab_ids = torch.arange(50000)
    u = hash_uniform(seeds, steps, vocab_ids)
    assert u.shape == (4, 50000) and u.dtype == torch.float32
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert abs(u.double().mean().item() - 0.5) < 0.005
    assert torch.equal(hash_uniform(seeds[2:3], steps[2:3], vocab_ids), u[2:3])
    assert not torch.equal(u[0], u[1])
    # Per-row id lists give the same value for the same (seed, step, token id).
    picked = torch.tensor([[7, 49999], [3, 0], [1, 2], [10, 20]])
    assert torch.equal(hash_uniform(seeds, steps, picked), u.gather(1, picked))
    # A seed past the int64 range wraps rather than failing.
    info = make_info([make_params()], seeds=[2**64 - 1])
    assert info.seeds.item() == -1


# ---- distributions ---------------------------------------------------------------------------

DIST_CASES = [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=10),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05),
]


@pytest.mark.parametrize("kw", DIST_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_sample_distribution_matches_reference(kw: dict) -> None:
    row = fixed_logits(1, scale=1.5, seed=3)[0]
    p = make_params(**kw)
    ref = ref_distribution(row.double().tolist(), p)
    tokens = sample_many(row, p)
    assert all(ref[t] > 0 for t in set(tokens.tolist())), "sampled a filtered-out token"
    assert tv_distance(empirical(tokens, VOCAB), ref) < 0.02


# ---- penalties -------------------------------------------------------------------------------


def test_apply_penalties_matches_reference() -> None:
    logits = fixed_logits(5)
    params = [make_params(repetition_penalty=1.5),
              make_params(presence_penalty=0.7),
              make_params(frequency_penalty=0.4, repetition_penalty=0.8),
              make_params(presence_penalty=-0.5, frequency_penalty=1.1, repetition_penalty=1.2),
              make_params()]
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (12,), generator=gen).tolist() for _ in range(5)]
    outputs = [torch.randint(0, VOCAB, (9,), generator=gen).tolist() for _ in range(5)]
    info = make_info(params, prompt_ids=prompts, output_ids=outputs)
    got = apply_penalties(logits, info)
    for i, p in enumerate(params):
        ref = ref_penalise(logits[i].double().tolist(), p, prompts[i], outputs[i])
        torch.testing.assert_close(got[i].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5, rtol=1e-6)


def test_partial_top_k_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    greedy, k5, k30 = make_params(temperature=0.0), make_params(top_k=5), make_params(top_k=30)
    assert make_info([greedy, k5, k30]).max_top_k == 30
    assert make_info([k5, make_params(top_p=0.9)]).max_top_k == 0  # one row has no top_k
    assert make_info([make_params(top_k=VOCAB + 5)]).max_top_k == 0

    def no_sort(*args, **kwargs):
        raise AssertionError("sorted the whole vocabulary")

    info = make_info([greedy, k5, make_params(top_k=30, top_p=0.9, min_p=0.05)], seeds=[1, 2, 3])
    monkeypatch.setattr(sampler_mod.torch, "sort", no_sort)
    ids = Sampler()(fixed_logits(3), info).next_token_ids
    ranks = torch.argsort(fixed_logits(3), dim=-1, descending=True)
    assert ids[0] == ranks[0, 0] and ids[1] in ranks[1, :5] and ids[2] in ranks[2, :30]


def test_penalty_tensors_built_only_when_used() -> None:
    info = make_info([make_params(presence_penalty=0.3), make_params()], output_ids=[[1, 1], [2]])
    assert info.seen_mask is None and info.repetition_penalties is None and info.frequency_penalties is None
    assert info.token_counts is not None and info.token_counts[0, 1] == 2 and info.token_counts[1, 2] == 1
    info = make_info([make_params(repetition_penalty=1.1)], prompt_ids=[[4]], output_ids=[[6]])
    assert info.token_counts is None and bool(info.seen_mask[0, 4]) and bool(info.seen_mask[0, 6])
    assert int(info.seen_mask.sum()) == 2


def test_in_flight_tokens_count_like_appended_ones() -> None:
    """Under overlapped decoding a row's previous token is still on the device: passed as
    ``in_flight_ids`` it must count for every penalty exactly as if it were in output_ids."""
    params = [make_params(repetition_penalty=1.5, presence_penalty=0.3),
              make_params(frequency_penalty=0.6), make_params(presence_penalty=-0.4)]
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, VOCAB, (7,), generator=gen).tolist() for _ in range(3)]
    outputs = [torch.randint(0, VOCAB, (5,), generator=gen).tolist() for _ in range(3)]
    in_flight = [outputs[0][2], 41, prompts[2][0]]  # seen before, new, only in the prompt
    want = make_info(params, prompt_ids=prompts, output_ids=[o + [t] for o, t in zip(outputs, in_flight)])
    got = SamplingBatchInfo.from_params(
        params, seeds=[7] * 3, steps=[0] * 3, vocab_size=VOCAB, device="cpu", prompt_ids=prompts,
        output_ids=outputs, in_flight_ids=torch.tensor(in_flight),
    )
    assert torch.equal(got.token_counts, want.token_counts) and torch.equal(got.seen_mask, want.seen_mask)
    logits = fixed_logits(3)
    assert torch.equal(apply_penalties(logits, got), apply_penalties(logits, want))


def test_penalised_distribution_matches_reference() -> None:
    row = fixed_logits(1, scale=1.5, seed=8)[0]
    p = make_params(temperature=1.0, top_p=0.95, repetition_penalty=1.3,
                    presence_penalty=0.4, frequency_penalty=0.2)
    order = torch.argsort(row, descending=True).tolist()
    prompt, output = order[:3] + [order[10]], [order[0], order[0], order[5], order[7]]
    ref = ref_distribution(ref_penalise(row.double().tolist(), p, prompt, output), p)
    tokens = sample_many(row, p, prompt_ids=[prompt] * TRIALS, output_ids=[output] * TRIALS)
    assert all(ref[t] > 0 for t in set(tokens.tolist()))
    assert tv_distance(empirical(tokens, VOCAB), ref) < 0.02


# ---- logprobs --------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax() -> None:
    logits = fixed_logits(4, vocab=100)
    params = [make_params(temperature=0.0, logprobs=True),
              make_params(temperature=0.8, top_k=5, repetition_penalty=1.4, top_logprobs=5),
              make_params(temperature=1.0, top_logprobs=3, presence_penalty=1.0),
              make_params(temperature=1.0)]
    info = make_info(params, vocab=100, seeds=[1, 2, 3, 4], steps=[0, 1, 2, 3],
                     prompt_ids=[[0, 1]] * 4, output_ids=[[2, 3]] * 4)
    assert info.return_logprob and info.top_logprobs_num == 5
    out = Sampler()(logits, info)
    ref = torch.log_softmax(logits.double(), dim=-1)
    chosen = out.next_token_ids
    torch.testing.assert_close(out.logprobs.double(), ref.gather(1, chosen.unsqueeze(1)).squeeze(1),
                               atol=1e-5, rtol=1e-6)
    assert out.top_logprob_ids.shape == (4, 5) and out.top_logprob_vals.dtype == torch.float32
    for i in range(4):
        ref_vals, ref_ids = torch.sort(ref[i], descending=True)
        assert out.top_logprob_ids[i].tolist() == ref_ids[:5].tolist()
        torch.testing.assert_close(out.top_logprob_vals[i].double(), ref_vals[:5], atol=1e-5, rtol=1e-6)


def test_no_logprobs_requested() -> None:
    info = make_info([make_params(temperature=1.0)] * 2)
    assert not info.return_logprob and info.top_logprobs_num == 0
    out = Sampler()(fixed_logits(2), info)
    assert out.logprobs is None and out.top_logprob_ids is None and out.top_logprob_vals is None


def test_plain_greedy_predicate() -> None:
    assert sampler_mod.is_plain_greedy([make_params(temperature=0.0), make_params(top_k=1)])
    assert sampler_mod.is_plain_greedy([])
    for kw in (dict(temperature=1.0), dict(temperature=0.0, logprobs=True),
               dict(temperature=0.0, top_logprobs=2), dict(temperature=0.0, repetition_penalty=1.1),
               dict(temperature=0.0, presence_penalty=0.5), dict(temperature=0.0, frequency_penalty=0.5),
               dict(temperature=0.0, logit_bias={1: 0.5})):
        assert not sampler_mod.is_plain_greedy([make_params(temperature=0.0), make_params(**kw)]), kw


def test_from_params_rows_keep_dtypes_and_values() -> None:
    params = [make_params(temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, presence_penalty=0.5),
              make_params(temperature=0.0, frequency_penalty=0.25)]
    info = make_info(params, seeds=[2**64 - 1, 3], steps=[4, 5], output_ids=[[1], [2]])
    assert info.temperatures.dtype == torch.float32 and info.top_ks.dtype == torch.int64
    assert info.temperatures.tolist() == pytest.approx([0.7, 0.0])
    assert info.top_ps.tolist() == pytest.approx([0.9, 1.0])
    assert info.min_ps.tolist() == pytest.approx([0.1, 0.0])
    assert info.top_ks.tolist() == [5, VOCAB]
    assert info.seeds.tolist() == [-1, 3] and info.steps.tolist() == [4, 5]
    assert info.repetition_penalties is None
    assert info.presence_penalties.tolist() == [0.5, 0.0]
    assert info.frequency_penalties.tolist() == [0.0, 0.25]


# ---- logit bias ------------------------------------------------------------------------------


def test_logit_bias_moves_the_greedy_choice() -> None:
    logits = fixed_logits(3)
    top = torch.argmax(logits, dim=-1).tolist()
    low = torch.argmin(logits, dim=-1).tolist()
    params = [make_params(temperature=0.0, logit_bias={low[0]: 100.0}),
              make_params(temperature=0.0, logit_bias={top[1]: -100.0}),
              make_params(temperature=0.0)]
    assert not sampler_mod.is_plain_greedy(params)
    out = Sampler()(logits, make_info(params)).next_token_ids.tolist()
    second = torch.topk(logits[1], 2).indices[1].item()
    assert out == [low[0], second, top[2]]


def test_logit_bias_distribution_matches_reference() -> None:
    row = fixed_logits(1, scale=1.5, seed=5)[0]
    order = torch.argsort(row, descending=True).tolist()
    bias = {order[0]: -3.0, order[20]: 4.0, order[-1]: 2.5}
    p = make_params(temperature=0.8, top_p=0.9, logit_bias=bias)
    biased = row.double().tolist()
    for token, value in bias.items():
        biased[token] += value
    ref = ref_distribution(biased, p)
    tokens = sample_many(row, p)
    assert all(ref[t] > 0 for t in set(tokens.tolist()))
    assert tv_distance(empirical(tokens, VOCAB), ref) < 0.02


def test_logit_bias_rows_and_raw_logprobs() -> None:
    logits = fixed_logits(2)
    params = [make_params(temperature=0.0, logprobs=True, logit_bias={3: 100.0, VOCAB + 5: 1.0}),
              make_params(temperature=0.0, logprobs=True)]
    info = make_info(params)
    want = torch.zeros(2, VOCAB)
    want[0, 3] = 100.0  # the id past the logits' width is dropped
    assert torch.equal(info.logit_biases, want)
    out = Sampler()(logits, info)
    assert out.next_token_ids[0].item() == 3
    # Logprobs stay those of the model's own distribution, as with the penalties.
    assert torch.allclose(out.logprobs[0], torch.log_softmax(logits[0], dim=-1)[3])
    assert make_info([make_params(temperature=1.0)]).logit_biases is None
    only_outside = make_info([make_params(temperature=0.0, logit_bias={VOCAB: 3.0})])
    assert torch.equal(only_outside.logit_biases, torch.zeros(1, VOCAB))


def test_logit_bias_parsing() -> None:
    # JSON object keys are strings; the engine keys by token id.
    assert SamplingParams.from_dict({"logit_bias": {"7": 5, "12": -1.5}}).logit_bias == {7: 5.0, 12: -1.5}
    assert SamplingParams.from_dict({}).logit_bias == {}
    for bad, needle in (({"x": 1}, "keys must be token ids"), ({"-2": 1}, "keys must be token ids"),
                        ({"3": 101}, r"\[-100, 100\]"), ({"3": "big"}, "values must be numbers"),
                        ([1, 2], "must be an object")):
        with pytest.raises(ValueError, match=needle):
            SamplingParams.from_dict({"logit_bias": bad})
