"""The Triton decode path of FlashInfer-backend CUDA graphs, on CPU.

Small graph batches decode with ``triton_decode`` (no host-side plan before a replay). Here the
whole graph path runs eagerly on CPU: the FlashInfer stand-in of test_flashinfer_metadata for
the prefill, Triton's interpreter for the decode kernels (TRITON_INTERPRET=1 is read when a
kernel is defined, so that part runs in a child process), float16 (the interpreter's bfloat16
dot is unreliable), compared with torch_native on the same KV cache.
"""

from __future__ import annotations


import torch

from pymllm.tests.helpers import assert_passes_under_triton_interpreter, record_decode_rope_fusions
from pymllm.layers.attention import flashinfer_backend as fib


def test_graph_decode_kernel_rule():
    small, large = fib.TRITON_GRAPH_DECODE_MAX_BS, fib.TRITON_GRAPH_DECODE_MAX_BS + 1
    assert fib.graph_decode_kernel(1, torch.bfloat16, 128) == "triton"
    assert fib.graph_decode_kernel(small, torch.float16, 64) == "triton"
    assert fib.graph_decode_kernel(large, torch.bfloat16, 128) == "flashinfer"
    assert fib.graph_decode_kernel(1, torch.float8_e4m3fn, 128) == "flashinfer"
    assert fib.graph_decode_kernel(1, torch.bfloat16, 96) == "flashinfer"  # not a power of two


def graph_path_checks(fused_ops_forced: bool = False, num_reqs: int = 3) -> None:
    """Prefill ``num_reqs`` prompts, then decode through the captured-graph metadata path (3 rows
    padded to 4, or 1 row), with the Triton kernels, against torch_native. Needs
    TRITON_INTERPRET=1.

    fused_ops_forced: the fused ops' device check bypassed (CPU tensors take the Triton kernels),
    so the one-row graph's attention also applies the q/k norms and rope and stores K/V itself
    (FlashInferAttnBackend.forward_decode_rope) in every layer; the 4-row graph must not."""
    import pytest

    from pymllm.layers import fused_ops

    from pymllm.engine.forward_batch import ForwardMode
    from pymllm.executor.cuda_graph_runner import CudaGraphRunner
    from pymllm.orchestrator.request import Req
    from pymllm.orchestrator.schedule_batch import ScheduledBatch
    from pymllm.testing.tiny_models import tiny_model_dir
    from pymllm.tests import test_flashinfer_metadata as tfm
    from pymllm.tests.helpers import greedy

    monkeypatch = pytest.MonkeyPatch()
    try:
        tfm.fake_flashinfer.__wrapped__(monkeypatch)
        fused_calls = record_decode_rope_fusions(monkeypatch)
        if fused_ops_forced:
            monkeypatch.setattr(fused_ops, "can_use_fast_path", lambda *t: fused_ops._same_device_and_dtype(*t))
        runner = tfm._runner(tiny_model_dir("qwen3"), dtype="float16")
        native = runner.attn_backend
        backend = fib.FlashInferAttnBackend(runner)
        reqs = []
        prompts = tfm.PROMPTS[:num_reqs]
        for i, ids in enumerate(prompts):
            req = Req(rid=str(i), origin_input_ids=ids, sampling_params=greedy(8), seed=0)
            req.req_pool_idx = runner.req_to_token_pool.alloc()
            reqs.append(req)
        alloc = runner.token_to_kv_pool_allocator.alloc
        lens = [len(p) for p in prompts]
        n = num_reqs
        batch = ScheduledBatch(ForwardMode.EXTEND, reqs, [0] * n, lens, alloc(sum(lens)), [True] * n)
        ref, _, _ = tfm._both(runner, native, backend, batch)
        for req, token in zip(reqs, ref.argmax(-1).tolist()):
            req.output_ids.append(token)

        runner.attn_backend = backend
        graphs = CudaGraphRunner(runner)
        for bs in reversed(graphs.batch_sizes):
            graphs.prepare_capture(bs)
            small = bs <= fib.TRITON_GRAPH_DECODE_MAX_BS
            assert backend.forward_metadata.kind == ("triton_decode" if small else "decode")
        for _ in range(3):
            lens = [len(r.fill_ids) - 1 for r in reqs]
            runner.cuda_graph_runner = graphs
            fb = runner.build_forward_batch(ScheduledBatch(ForwardMode.DECODE, reqs, lens, [1] * n, alloc(n), [True] * n))
            runner.cuda_graph_runner = None
            padded = graphs.prepare_replay(fb)
            assert padded == (4 if n == 3 else n)
            assert backend.forward_metadata.kind == "triton_decode"
            fused_calls.clear()
            tokens = graphs.inputs.input_ids.clone()
            with torch.inference_mode():
                got = graphs.run_static(padded)[0][:n]
            graphs.inputs.input_ids.copy_(tokens)  # the argmax fed its ids there; the reference reads the step's
            # Without the forced fast path the backend is asked in every layer and declines
            # (CPU tensors fail the fused ops' device check).
            want = (padded == 1) and fused_ops_forced
            assert fused_calls == [want] * len(runner.model.model.layers), fused_calls
            ref = tfm._forward_with(runner, native, fb)
            torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
            for req, token in zip(reqs, ref.argmax(-1).tolist()):
                req.output_ids.append(token)
    finally:
        monkeypatch.undo()


def test_graph_path_matches_torch_native_under_interpreter():
    assert_passes_under_triton_interpreter("pymllm.tests.test_triton_graph_decode", "graph_path_checks")


def graph_path_fused_rope_checks() -> None:
    graph_path_checks(fused_ops_forced=True, num_reqs=1)
    graph_path_checks(fused_ops_forced=True, num_reqs=3)


def test_graph_path_with_rope_in_attention_matches_torch_native_under_interpreter():
    assert_passes_under_triton_interpreter("pymllm.tests.test_triton_graph_decode", "graph_path_fused_rope_checks")
