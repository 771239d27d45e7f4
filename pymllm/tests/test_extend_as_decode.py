"""Short extends replayed through the decode graphs, one row per new token, on CPU.

The CUDA-graph path is emulated eagerly as in test_flashinfer_metadata (FlashInfer stand-in,
static buffers, float32): the rows must give exactly the logits of an ordinary extend, for a
continued chunk, for a prefix-cache hit (whose cached slots are copied into the request's row
first) and for a batch of two requests.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from pymllm.engine.forward_batch import ForwardMode
from pymllm.executor.batch_inputs import extend_as_decode_rows, extend_host_batch
from pymllm.executor.cuda_graph_runner import CudaGraphRunner
from pymllm.layers.attention import flashinfer_backend as fib
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.testing.tiny_models import tiny_model_dir
from pymllm.tests.helpers import greedy
from pymllm.tests.test_flashinfer_metadata import _runner, fake_flashinfer  # noqa: F401  (fixture)

PROMPT = [5, 17, 300, 42, 7, 99, 12, 250, 61, 11, 12, 13, 14, 15, 400, 2, 90, 33, 8, 71]


def test_rows_of_an_extend_batch():
    # Two requests: 3 new tokens after 4 cached (row 5), 2 new after none (row 9), plus a
    # cached prefix copied into row 5.
    hb = extend_host_batch([[1, 2, 3], [4, 5]], [4, 0], [5, 9], [20, 21, 22, 23, 24], 100,
                           cached_prefixes=[(5, np.array([7, 8, 9, 10]))])
    ext = extend_as_decode_rows(hb)
    assert ext.rows.input_ids.tolist() == [1, 2, 3, 4, 5]
    assert ext.rows.req_pool_indices.tolist() == [5, 5, 5, 9, 9]
    assert ext.rows.positions.tolist() == [4, 5, 6, 0, 1]
    assert ext.rows.seq_lens.tolist() == [5, 6, 7, 1, 2]  # each row sees its prefix and itself
    assert ext.rows.kv_write_index.tolist() == [504, 505, 506, 900, 901]
    assert ext.rows.kv_write_loc.tolist() == [20, 21, 22, 23, 24]
    assert ext.prefix_write_index.tolist() == [500, 501, 502, 503]
    assert ext.prefix_write_loc.tolist() == [7, 8, 9, 10]
    assert ext.sample_rows == [2, 4]


def _graph_rows_logits(runner, graphs, batch):
    """build_forward_batch through the graph path, then the captured forward run eagerly."""
    runner.cuda_graph_runner = graphs
    fb = runner.build_forward_batch(batch)
    runner.cuda_graph_runner = None
    assert fb.forward_mode == ForwardMode.DECODE and fb.sample_rows is not None
    padded = graphs.prepare_replay(fb)
    with torch.inference_mode():
        logits, _ = graphs.run_static(padded, shared_prefix=graphs._staged.shared_prefix)
    return logits[fb.sample_rows], fb


def _prefix_case(new_tokens):
    """A runner where request A's 12-token prefix was computed eagerly (torch_native), the
    logits of A's next ``new_tokens`` tokens as an ordinary extend (the reference), and then the
    FlashInfer backend with every graph bucket prepared (shared-prefix buckets too, where the
    backend supports them)."""
    runner = _runner(tiny_model_dir("qwen3"), max_total_tokens=512)
    native = runner.attn_backend
    alloc = runner.token_to_kv_pool_allocator.alloc

    def request(rid):
        req = Req(rid=rid, origin_input_ids=PROMPT, sampling_params=greedy(4), seed=0)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        return req

    a = request("a")
    prefix_slots = alloc(12)
    runner.run_batch(ScheduledBatch(ForwardMode.EXTEND, [a], [0], [12], prefix_slots, [False]))
    a.append_kv_slots(prefix_slots)
    with torch.inference_mode():
        reference = runner.forward(runner.build_forward_batch(
            ScheduledBatch(ForwardMode.EXTEND, [a], [12], [new_tokens], alloc(new_tokens), [True]))).clone()

    runner.attn_backend = fib.FlashInferAttnBackend(runner)
    graphs = CudaGraphRunner(runner)
    for bs in reversed(graphs.batch_sizes):
        graphs.prepare_capture(bs)
    for bs in reversed(graphs.shared_prefix_sizes):
        graphs.prepare_capture(bs, shared_prefix=True)
    return SimpleNamespace(runner=runner, native=native, alloc=alloc, request=request, a=a,
                           prefix_slots=prefix_slots, reference=reference, graphs=graphs)


def test_extend_rows_equal_an_ordinary_extend(fake_flashinfer):  # noqa: F811
    case = _prefix_case(8)
    runner, native, alloc, request, a = case.runner, case.native, case.alloc, case.request, case.a
    prefix_slots, reference, graphs = case.prefix_slots, case.reference, case.graphs
    assert max(graphs.batch_sizes) >= 8

    # The continued chunk of A (its row already holds the prefix).
    got, fb = _graph_rows_logits(runner, graphs, ScheduledBatch(ForwardMode.EXTEND, [a], [12], [8], alloc(8), [True]))
    assert fb.batch_size == 8 and fb.sample_rows == [7]
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)

    # A prefix-cache hit: B's row gets A's 12 cached slots in the same forward.
    b = request("b")
    b.kv_slots, b.cache_owned_len = prefix_slots, 12
    got, _ = _graph_rows_logits(runner, graphs, ScheduledBatch(ForwardMode.EXTEND, [b], [12], [8], alloc(8), [True]))
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
    row = runner.req_to_token_pool.req_to_token[b.req_pool_idx, :12]
    assert row.tolist() == prefix_slots.tolist()

    # Two requests in one extend: C starts from scratch (5 tokens), D continues on the prefix.
    c, d = request("c"), request("d")
    d.kv_slots, d.cache_owned_len = prefix_slots, 12
    batch = ScheduledBatch(ForwardMode.EXTEND, [c, d], [0, 12], [5, 8], alloc(13), [False, True])
    got, fb = _graph_rows_logits(runner, graphs, batch)
    assert fb.sample_rows == [4, 12]
    torch.testing.assert_close(got[1:], reference, rtol=1e-4, atol=1e-4)
    runner.attn_backend = native
    with torch.inference_mode():
        c2 = request("c2")
        ref_c = runner.forward(runner.build_forward_batch(
            ScheduledBatch(ForwardMode.EXTEND, [c2], [0], [5], alloc(5), [False])))
    torch.testing.assert_close(got[:1], ref_c, rtol=1e-4, atol=1e-4)


def _shared_prefix_reference(q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, sm_scale, num_splits,
                             window_left=-1, **launch_options):
    """PyTorch stand-in for triton_shared_prefix.shared_prefix_attention: every row reads the first
    row's request, up to its own length (the Triton kernel runs on CUDA only)."""
    rows, num_heads, _ = q.shape
    group = num_heads // k_buf.shape[1]
    slots = req_to_token[int(req_pool_indices[0])].long()
    out = torch.empty_like(q)
    for i in range(rows):
        n = int(seq_lens[i])
        lo = max(0, n - 1 - window_left) if window_left >= 0 else 0
        k = k_buf[slots[lo:n]].repeat_interleave(group, dim=1).float()
        v = v_buf[slots[lo:n]].repeat_interleave(group, dim=1).float()
        scores = torch.einsum("hd,khd->hk", q[i].float(), k) * sm_scale
        out[i] = torch.einsum("hk,khd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


def test_single_request_extend_uses_the_shared_prefix_graphs(fake_flashinfer, monkeypatch):  # noqa: F811
    from pymllm.layers.attention import triton_shared_prefix

    monkeypatch.setattr(fib.FlashInferAttnBackend, "supports_shared_prefix_graphs", lambda self: True)
    monkeypatch.setattr(triton_shared_prefix, "shared_prefix_attention", _shared_prefix_reference)
    case = _prefix_case(7)
    runner, alloc, request = case.runner, case.alloc, case.request
    prefix_slots, reference, graphs = case.prefix_slots, case.reference, case.graphs
    assert graphs.shared_prefix_sizes and min(graphs.shared_prefix_sizes) >= 2
    assert max(graphs.shared_prefix_sizes) <= 32

    # A prefix-cache hit of one request: 7 rows padded to 8, all reading B's row once.
    b = request("b")
    b.kv_slots, b.cache_owned_len = prefix_slots, 12
    got, fb = _graph_rows_logits(runner, graphs, ScheduledBatch(ForwardMode.EXTEND, [b], [12], [7], alloc(7), [True]))
    assert graphs._staged.shared_prefix and graphs._staged.padded_bs == 8
    assert runner.attn_backend.forward_metadata.kind == "triton_shared_prefix"
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)

    # Two requests in one extend read different rows: the ordinary decode graphs.
    c, d = request("c"), request("d")
    d.kv_slots, d.cache_owned_len = prefix_slots, 12
    got, fb = _graph_rows_logits(runner, graphs, ScheduledBatch(ForwardMode.EXTEND, [c, d], [0, 12], [5, 7],
                                                                alloc(12), [False, True]))
    assert not graphs._staged.shared_prefix
    assert runner.attn_backend.forward_metadata.kind != "triton_shared_prefix"
    torch.testing.assert_close(got[1:], reference, rtol=1e-4, atol=1e-4)

