"""Piecewise prefill graphs on a CUDA device (marked gpu): replayed pieces with eager attention
between them against the plain eager forward (same backend, same batch), against transformers
for compressed-tensors checkpoints, and greedy output through the scheduler."""

from __future__ import annotations

from typing import List

import pytest
import torch

from pymllm.engine.forward_batch import ForwardMode
from pymllm.executor.prefill_graphs import PrefillGraphs
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.tests.test_gpu_fast_path import TINY, _flashinfer_backend_cls, _forward_with, _runner, greedy
from pymllm.testing.tiny_models import tiny_model_dir

pytestmark = pytest.mark.gpu


def _requests(runner, lengths: List[int], seed: int) -> List[Req]:
    gen = torch.Generator().manual_seed(seed)
    reqs = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, 400, (n,), generator=gen).tolist()
        req = Req(rid=str(i), origin_input_ids=ids, sampling_params=greedy(1), seed=0)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        reqs.append(req)
    return reqs


def _spy_runs(graphs: PrefillGraphs) -> List[int]:
    runs: List[int] = []
    run = graphs.run

    def spy(fb, bucket):
        runs.append(bucket)
        return run(fb, bucket)

    graphs.run = spy
    return runs


@pytest.mark.parametrize("backend", ["flashinfer", "torch_native"])
def test_replayed_pieces_equal_the_eager_forward(backend):
    """Single prompts at and between buckets, a batch of three, and an extend on a cached prefix
    (FlashInfer's paged path): logits and the KV entries written match the eager forward, and
    padding rows write nowhere but slot 0."""
    if backend == "flashinfer":
        _flashinfer_backend_cls()
    runner = _runner(tiny_model_dir("qwen3", **TINY), backend, max_total_tokens=4096,
                     prefill_cuda_graph_max_tokens=256)
    graphs = runner.prefill_graphs
    assert graphs is not None and graphs.buckets[0] == 48 and graphs.buckets[-1] == 256
    runs = _spy_runs(graphs)
    alloc = runner.token_to_kv_pool_allocator.alloc
    k0, v0 = runner.kv_pool.get_kv_buffer(0)
    cases = [([40], None), ([100], None), ([256], None), ([70, 33, 50], None), ([60], [100])]
    for seed, (lengths, prefix) in enumerate(cases):
        reqs = _requests(runner, [n + (p or 0) for n, p in zip(lengths, prefix or [0] * len(lengths))], seed)
        starts = prefix or [0] * len(reqs)
        if prefix:
            runner.forward(runner.build_forward_batch(ScheduledBatch(
                ForwardMode.EXTEND, reqs, [0] * len(reqs), prefix, alloc(sum(prefix)), [False] * len(reqs))))
        slots = alloc(sum(lengths))
        fb = runner.build_forward_batch(
            ScheduledBatch(ForwardMode.EXTEND, reqs, starts, lengths, slots, [True] * len(reqs)))
        before = len(runs)
        k_before = k0.clone()
        got = runner.forward(fb).clone()
        assert len(runs) == before + 1, "the prefill did not replay the pieces"
        k_graph = k0.clone()
        ref = _forward_with(runner, runner.attn_backend, fb)  # eager; rewrites the same slots
        assert torch.isfinite(got).all()
        # n rows against a bucket's rows: the GEMMs may pick other kernels for the two row
        # counts (another summation order), so the whole-model measure of test_gpu_fast_path.
        assert ((got - ref).norm() / ref.norm()).item() < 1e-2, (lengths, prefix)
        assert (got - ref).abs().max().item() < 0.5
        idx = torch.as_tensor(slots, device=k0.device)
        torch.testing.assert_close(k_graph[idx].float(), k0[idx].float(), rtol=2e-2, atol=2e-2)
        untouched = torch.ones(k0.shape[0], dtype=torch.bool, device=k0.device)
        untouched[idx] = False
        untouched[0] = False
        assert torch.equal(k_graph[untouched], k_before[untouched])
        for req in reqs:
            runner.req_to_token_pool.free(req.req_pool_idx)


def test_qwen3_vl_text_prefill_replays_the_pieces():
    """Qwen3-VL's language model on a text-only prompt: the pieces against its eager forward."""
    from pymllm.testing.tiny_models import tiny_vl_model_dir

    runner = _runner(tiny_vl_model_dir(), "torch_native", max_total_tokens=1024)
    runs = _spy_runs(runner.prefill_graphs)
    reqs = _requests(runner, [90], seed=3)
    slots = runner.token_to_kv_pool_allocator.alloc(90)
    fb = runner.build_forward_batch(ScheduledBatch(ForwardMode.EXTEND, reqs, [0], [90], slots, [True]))
    got = runner.forward(fb).clone()
    assert runs == [96]
    ref = _forward_with(runner, runner.attn_backend, fb)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2


def test_prefill_graphs_on_a_compressed_tensors_checkpoint(tmp_path):
    """W8A8 and W4A16 (CUTLASS / Triton / the W4A16 kernels captured at prefill row counts)
    against transformers on the library's decompressed weights, float16."""
    pytest.importorskip("compressed_tensors")
    from pymllm.tests.test_compressed_tensors_runtime import (
        CHECKPOINTS, base_checkpoint, quantize_with_compressed_tensors, reference_model,
    )

    prompts = [torch.randint(1, 400, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (57, 130)]
    for name in ("w8a8", "w4a16-g128"):
        preset, overrides = CHECKPOINTS[name]
        path = quantize_with_compressed_tensors(base_checkpoint(), tmp_path / name, preset, overrides)
        runner = _runner(path, "torch_native", dtype="float16", max_total_tokens=1024)
        runs = _spy_runs(runner.prefill_graphs)
        model = reference_model(path, torch.float16, "cuda")
        for ids in prompts:
            req = Req(rid="0", origin_input_ids=ids, sampling_params=greedy(1), seed=0)
            req.req_pool_idx = runner.req_to_token_pool.alloc()
            slots = runner.token_to_kv_pool_allocator.alloc(len(ids))
            got = runner.forward(runner.build_forward_batch(
                ScheduledBatch(ForwardMode.EXTEND, [req], [0], [len(ids)], slots, [True])))
            with torch.no_grad():
                expected = model(torch.tensor([ids], device="cuda")).logits[0, -1].float()
            spread = expected.std()
            bound = 0.2 if name == "w8a8" else 0.1  # as test_logits_on_gpu
            assert ((got[0] - expected).abs() / spread).max() < bound, (name, len(ids))
            runner.req_to_token_pool.free(req.req_pool_idx)
        assert len(runs) == len(prompts), name


def test_greedy_through_the_scheduler_with_and_without_prefill_graphs():
    """Prompts of 40-200 tokens, staggered, through the scheduler with FlashInfer: the same greedy
    tokens with the prefill graphs as with eager prefills (or a parting at a near-tie)."""
    _flashinfer_backend_cls()
    from pymllm.engine.io_struct import TokenizedGenerateReq
    from pymllm.orchestrator.scheduler_process import build_scheduler
    from pymllm.configs import GlobalConfig
    from pymllm.tests.test_gpu_fast_path import _assert_greedy_runs_agree

    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 400, (n,), generator=gen).tolist() for n in (40, 200, 75, 120)]

    def run(max_tokens: int):
        config = GlobalConfig()
        server = config.server
        server.model_path = str(tiny_model_dir("qwen3", **TINY))
        server.device, server.dtype, server.attention_backend = "cuda", "bfloat16", "flashinfer"
        server.max_total_tokens, server.max_running_requests = 2048, 4
        server.prefill_cuda_graph_max_tokens = max_tokens
        config.validate()
        sched = build_scheduler(config)
        assert (sched.runner.prefill_graphs is not None) == (max_tokens > 0)
        steps: List[torch.Tensor] = []
        forward = sched.runner.forward

        def recording(fb):
            logits = forward(fb)
            steps.append(logits.detach().clone())
            return logits

        sched.runner.forward = recording
        reqs, step = {}, 0
        while len(reqs) < len(prompts) or sched.has_work():
            if step < len(prompts):
                reqs[str(step)] = sched.add_request(
                    TokenizedGenerateReq(str(step), prompts[step], greedy(8, ignore_eos=True)))
            sched.step()
            step += 1
            assert step < 1000
        return [reqs[str(i)].output_ids for i in range(len(prompts))], steps

    ref_out, ref_steps = run(0)
    got_out, got_steps = run(256)
    _assert_greedy_runs_agree(ref_out, ref_steps, got_out, got_steps)
