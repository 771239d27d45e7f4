"""Split-KV Triton decode attention against a float64 PyTorch reference.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, read when a kernel is
defined, hence a child process); on CUDA (marked gpu) they run for real, also captured in a
CUDA graph whose lengths change between replays without any host-side re-planning.
"""

from __future__ import annotations


import pytest
import torch

from pymllm.tests.helpers import assert_passes_under_triton_interpreter


def reference(q, k_buf, v_buf, req_to_token, req_idx, seq_lens, sm_scale, window_left=-1):
    out = torch.empty_like(q)
    group = q.shape[1] // k_buf.shape[1]
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        lo = 0 if window_left < 0 else max(0, n - 1 - window_left)
        slots = req_to_token[int(req_idx[b]), lo:n].long()
        keys = k_buf[slots].double().repeat_interleave(group, dim=1)  # [L, Hq, D]
        values = v_buf[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].double(), keys) * sm_scale
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(-1), values).to(q.dtype)
    return out


def make_case(batch, hq, hkv, d, lens, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    slots = 1 + sum(lens) + 7
    k_buf = torch.randn(slots, hkv, d, generator=gen).to(dtype=dtype, device=device)
    v_buf = torch.randn(slots, hkv, d, generator=gen).to(dtype=dtype, device=device)
    q = torch.randn(batch, hq, d, generator=gen).to(dtype=dtype, device=device)
    req_to_token = torch.zeros(batch + 2, max(lens) + 5, dtype=torch.int32)
    perm = torch.randperm(slots - 1, generator=gen) + 1  # slot 0 is the padding slot
    used = 0
    req_idx = torch.randperm(batch + 2, generator=gen)[:batch]
    for b, n in enumerate(lens):
        req_to_token[req_idx[b], :n] = perm[used : used + n].to(torch.int32)
        used += n
    seq_lens = torch.tensor(lens, dtype=torch.int64)
    return q, k_buf, v_buf, req_to_token.to(device), req_idx.to(device), seq_lens.to(device)


def _check(case, num_splits, window_left, tol):
    from pymllm.layers.attention.triton_decode import decode_attention

    q, k_buf, v_buf, r2t, req_idx, seq_lens = case
    sm_scale = q.shape[-1] ** -0.5
    got = decode_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, sm_scale, num_splits, window_left,
                           out=torch.full_like(q, float("nan")))
    want = reference(q.cpu(), k_buf.cpu(), v_buf.cpu(), r2t.cpu(), req_idx.cpu(), seq_lens.cpu(), sm_scale, window_left)
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol)


def interpreter_checks() -> None:
    # GQA 2 and 4 and MHA; lengths from 1 to past one split; more splits than tokens; windows.
    for hq, hkv in ((4, 2), (8, 2), (2, 2)):
        case = make_case(3, hq, hkv, 16, [1, 37, 70], torch.float16, "cpu", seed=hq)
        for num_splits, window in ((1, -1), (4, -1), (16, -1), (4, 9)):
            _check(case, num_splits, window, tol=2e-3)
    # bfloat16 is left to the GPU tests: the interpreter's tl.dot misreads bfloat16 operands
    # (triton 3.x numpy backend), while float16 goes through the same code path exactly.


def test_kernels_under_interpreter() -> None:
    assert_passes_under_triton_interpreter("pymllm.tests.test_triton_decode", "interpreter_checks")


def fused_merge_checks() -> None:
    """The in-kernel merge (last program of a (sequence, KV head) merges) across consecutive
    launches on one counter buffer, as graph replays and successive layers run it: the lengths
    change between calls, some calls leave splits empty (5 tokens over 8 splits), and after
    every call the counters must be back at zero for the next one."""
    from pymllm.layers.attention.triton_decode import arrival_counters, decode_attention

    for hq, hkv in ((4, 2), (8, 2)):  # GQA groups 2 and 4
        for capacity, calls in (
            ([70], [([70], -1), ([5], -1), ([33], 9)]),
            ([60, 40, 70], [([1, 37, 70], -1), ([60, 2, 45], -1), ([30, 40, 3], 9)]),
        ):
            batch = len(capacity)
            q, k_buf, v_buf, r2t, req_idx, _ = make_case(batch, hq, hkv, 16, capacity, torch.float16, "cpu", seed=batch)
            counters = arrival_counters(4, hkv, "cpu")  # sized for more sequences than this batch
            for num_splits in (2, 8):
                for lens, window in calls:
                    seq_lens = torch.tensor(lens)
                    got = decode_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, 0.25, num_splits, window,
                                           out=torch.full_like(q, float("nan")), counters=counters)
                    assert not counters.any(), (lens, num_splits, counters)
                    want = reference(q, k_buf, v_buf, r2t, req_idx, seq_lens, 0.25, window)
                    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)
                    # Same partials, merged in another order: the two-launch form agrees to rounding.
                    two_launch = decode_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, 0.25, num_splits,
                                                  window, out=torch.full_like(q, float("nan")), separate_merge=True)
                    torch.testing.assert_close(got, two_launch, rtol=1e-3, atol=1e-3)


def test_fused_merge_under_interpreter() -> None:
    assert_passes_under_triton_interpreter("pymllm.tests.test_triton_decode", "fused_merge_checks")


def test_num_splits_rule() -> None:
    from pymllm.layers.attention.triton_decode import num_splits_for

    assert num_splits_for(1, 8, 132) == 16  # one sequence: spread it over the SMs, up to the cap
    assert num_splits_for(2, 8, 132) == 16 and num_splits_for(4, 8, 132) == 16
    assert num_splits_for(64, 8, 132) == 1  # one full wave already
    assert num_splits_for(128, 8, 132) == 1  # two full waves: splitting gains nothing
    assert num_splits_for(96, 8, 132) == 2  # 1.45 waves unsplit; 2.9 waves of half the work
    assert num_splits_for(32, 8, 132) == 2 and num_splits_for(16, 8, 132) == 4  # as measured best
    assert num_splits_for(4, 8, 16) == 2
    for bs in range(1, 300):
        s = num_splits_for(bs, 8, 132)
        assert s & (s - 1) == 0 and 1 <= s <= 16
    # The one-row graph's cap (ROPE_MAX_SPLITS = 32): one sequence of 8 KV heads takes 32 splits,
    # 32 KV heads stay at 16 (32 splits would be two waves for the same time).
    assert num_splits_for(1, 8, 132, 32) == 32 and num_splits_for(1, 32, 132, 32) == 16
    assert num_splits_for(1, 8, 132, 8) == 8


def test_launch_settings_rule() -> None:
    import inspect

    from pymllm.layers.attention import triton_decode as td

    # One setting for every batch size: decode_attention's defaults, the sweep's best.
    defaults = inspect.signature(td.decode_attention).parameters
    assert (defaults["block"].default, defaults["num_stages"].default, defaults["num_warps"].default) == (64, 3, 4)
    assert (td.BLOCK_N, td.NUM_STAGES) == (64, 3)


def test_kv_prefetch_lines_cover_each_row() -> None:
    # One prefetch address per 128-byte line of a K/V row (bf16 head_dim 128: two lines), the whole
    # row when it is shorter than a line; a whole number of addresses per row in every case.
    from pymllm.layers.attention.triton_decode import PREFETCH_BLOCKS, prefetch_line_elems

    assert prefetch_line_elems(128, 2) == 64 and prefetch_line_elems(128, 1) == 128  # bf16; fp8
    assert prefetch_line_elems(256, 4) == 32 and prefetch_line_elems(16, 2) == 16
    for head_dim in (16, 32, 64, 128, 256):
        for size in (1, 2, 4):
            line = prefetch_line_elems(head_dim, size)
            assert head_dim % line == 0 and line * size <= 128
    assert PREFETCH_BLOCKS >= 1


def test_rejects_unsupported_shapes() -> None:
    from pymllm.layers.attention.triton_decode import decode_attention

    q, k_buf, v_buf, r2t, req_idx, seq_lens = make_case(1, 6, 4, 16, [3], torch.float16, "cpu")
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, 0.25, 1)
    q, k_buf, v_buf, r2t, req_idx, seq_lens = make_case(1, 4, 2, 16, [3], torch.float16, "cpu")
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, 0.25, 3)
    with pytest.raises(ValueError, match="counters"):  # too few for 1 sequence x 2 KV heads
        decode_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, 0.25, 2, counters=torch.zeros(1, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv, d", [(32, 8, 128), (16, 8, 128), (8, 8, 64)])
@pytest.mark.parametrize("lens", [[1], [1090], [5, 2048, 77, 300]])
def test_gpu_matches_reference(hq, hkv, d, lens) -> None:
    from pymllm.layers.attention.triton_decode import num_splits_for

    case = make_case(len(lens), hq, hkv, d, lens, torch.bfloat16, "cuda", seed=len(lens))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    _check(case, num_splits_for(len(lens), hkv, sms), -1, tol=2e-2)
    _check(case, 1, 63, tol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv", [(32, 8), (16, 8)])
@pytest.mark.parametrize("lens", [[1], [129], [1090, 3, 2048, 600]])
def test_gpu_error_within_flashinfer_error(hq, hkv, lens) -> None:
    """Against the float64 reference, the Triton kernel errs no more than FlashInfer's
    tensor-core decode on the same bf16 inputs: both round P to bf16 for the P @ V product on
    tensor cores. (FlashInfer's CUDA-core decode keeps P in float32 and is ~2x more accurate on
    average; the prefill kernels round like the tensor-core decode.)"""
    flashinfer = pytest.importorskip("flashinfer")
    from pymllm.layers.attention.triton_decode import decode_attention, num_splits_for

    q, k_buf, v_buf, r2t, req_idx, seq_lens = make_case(len(lens), hq, hkv, 128, lens, torch.bfloat16, "cuda", seed=3)
    sm_scale = 128**-0.5
    want = reference(q.cpu(), k_buf.cpu(), v_buf.cpu(), r2t.cpu(), req_idx.cpu(), seq_lens.cpu(), sm_scale).float()
    splits = num_splits_for(len(lens), hkv, torch.cuda.get_device_properties(0).multi_processor_count)
    got = decode_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, sm_scale, splits).cpu().float()
    indptr = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    indices = torch.cat([r2t[int(req_idx[b]), :n] for b, n in enumerate(lens)]).to(torch.int32)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(128 << 20, dtype=torch.uint8, device="cuda"), "NHD", use_tensor_cores=True)
    wrapper.plan(indptr, indices, torch.ones(len(lens), dtype=torch.int32), hq, hkv, 128, 1,
                 q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, sm_scale=sm_scale)
    fi = wrapper.run(q, (k_buf, v_buf)).cpu().float()
    # Both round P and the output to bf16, so single elements may differ by an ulp either way
    # (more where the weighted sum cancels): the worst error stays within twice FlashInfer's,
    # and the mean error matches it.
    scale = want.abs().max().item()
    max_triton, max_fi = (got - want).abs().max().item(), (fi - want).abs().max().item()
    assert max_triton <= 2 * max_fi + 2**-9 * scale, (max_triton, max_fi)
    err_triton, err_fi = (got - want).abs().mean().item(), (fi - want).abs().mean().item()
    assert err_triton <= 1.25 * err_fi + 1e-5, (err_triton, err_fi)


@pytest.mark.gpu
def test_gpu_graph_replay_follows_device_lengths() -> None:
    from pymllm.layers.attention.triton_decode import arrival_counters, decode_attention

    q, k_buf, v_buf, r2t, req_idx, seq_lens = make_case(2, 32, 8, 128, [700, 40], torch.bfloat16, "cuda")
    lens = seq_lens.clone()
    out = torch.empty_like(q)
    counters = arrival_counters(2, 8, "cuda")
    decode_attention(q, k_buf, v_buf, r2t, req_idx, lens, 128**-0.5, 16, out=out, counters=counters)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, k_buf, v_buf, r2t, req_idx, lens, 128**-0.5, 16, out=out, counters=counters)
    for new_lens in ([700, 40], [1, 705], [512, 512]):
        lens.copy_(torch.tensor(new_lens))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert not counters.any()
        want = reference(q.cpu(), k_buf.cpu(), v_buf.cpu(), r2t.cpu(), req_idx.cpu(), lens.cpu(), 128**-0.5)
        torch.testing.assert_close(out.cpu().float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv", [(16, 8), (32, 8)])
def test_gpu_fused_merge_under_concurrency(hq, hkv) -> None:
    """The in-kernel merge reads partials that other SMs wrote an instant earlier: if the
    release/acquire of the arrival counter failed to order them, some launch would merge a stale
    or half-written partial. Back-to-back launches on one counter buffer, each with other lengths
    than the one before (so a stale partial is a wrong one), 32 splits (most programs of a
    sequence run at once): each must match the two-launch form to rounding (the merge order
    differs), and two passes over the same lengths must agree bit for bit."""
    from pymllm.layers.attention.triton_decode import arrival_counters, decode_attention

    lens = [3000, 1, 777]
    q, k_buf, v_buf, r2t, req_idx, _ = make_case(3, hq, hkv, 128, lens, torch.bfloat16, "cuda", seed=5)
    counters = arrival_counters(3, hkv, "cuda")
    gen = torch.Generator().manual_seed(0)
    all_lens = [torch.stack([torch.randint(1, n + 1, (), generator=gen) for n in lens]).cuda() for _ in range(300)]
    want = [decode_attention(q, k_buf, v_buf, r2t, req_idx, n, 128**-0.5, 32, separate_merge=True) for n in all_lens]

    def fused_pass():
        return [decode_attention(q, k_buf, v_buf, r2t, req_idx, n, 128**-0.5, 32, counters=counters,
                                 out=torch.full_like(q, float("nan"))) for n in all_lens]

    first, second = fused_pass(), fused_pass()
    torch.cuda.synchronize()
    assert not counters.any()
    for got, again, ref in zip(first, second, want):
        assert torch.equal(got, again)
        torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-3)
