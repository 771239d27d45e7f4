"""Shared-prefix attention (a short extend's rows of one request, its KV read once) against a
float64 causal reference and against the per-row decode kernel.

On CPU the kernels run under Triton's interpreter in a child process; on CUDA (marked gpu) for
real, also captured in a CUDA graph whose lengths change between replays.
"""

from __future__ import annotations

import pytest
import torch

from pymllm.tests.helpers import assert_passes_under_triton_interpreter


def make_extend_case(hq, hkv, d, prefix, new, pad, dtype, device, seed=0, capacity=None):
    """One request whose first ``prefix`` positions are cached and whose next ``new`` tokens are
    the query rows (row i at position prefix + i, seq_len prefix + i + 1), followed by ``pad``
    padding rows (seq_len 1, another req_pool_index), as a CUDA graph pads a decode batch.
    ``capacity`` (>= prefix + new) sizes the page-table row, so later calls can grow."""
    gen = torch.Generator().manual_seed(seed)
    capacity = capacity or prefix + new
    slots = capacity + 16
    k_buf = torch.randn(slots, hkv, d, generator=gen).to(dtype=dtype, device=device)
    v_buf = torch.randn(slots, hkv, d, generator=gen).to(dtype=dtype, device=device)
    q = torch.randn(new + pad, hq, d, generator=gen).to(dtype=dtype, device=device)
    req_to_token = torch.zeros(4, capacity + 3, dtype=torch.int32)
    req_to_token[2, :capacity] = (torch.randperm(slots - 1, generator=gen)[:capacity] + 1).to(torch.int32)
    req_to_token[0, :4] = torch.tensor([7, 3, 5, 1], dtype=torch.int32)  # the padding rows' request
    req_idx = torch.tensor([2] * new + [0] * pad)
    seq_lens = torch.tensor([prefix + i + 1 for i in range(new)] + [1] * pad)
    return q, k_buf, v_buf, req_to_token.to(device), req_idx.to(device), seq_lens.to(device)


def causal_reference(q, k_buf, v_buf, req_to_token, leader, positions, sm_scale, window_left=-1):
    """Plain causal attention in float64: gather the request's K/V once, query row i (at
    ``positions[i]``) sees keys at positions <= its own (and >= positions[i] - window_left)."""
    n = int(max(positions)) + 1
    slots = req_to_token[leader, :n].long()
    group = q.shape[1] // k_buf.shape[1]
    keys = k_buf[slots].double().repeat_interleave(group, dim=1)  # [L, Hq, D]
    values = v_buf[slots].double().repeat_interleave(group, dim=1)
    scores = torch.einsum("rhd,lhd->rhl", q.double(), keys) * sm_scale
    pos = torch.tensor(positions)[:, None]
    key_pos = torch.arange(n)[None, :]
    visible = key_pos <= pos
    if window_left >= 0:
        visible &= key_pos >= pos - window_left
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("rhl,lhd->rhd", scores.softmax(-1), values).to(q.dtype)


def _check_shared(case, new, num_splits, window_left, counters, tol, separate_merge=False, vs_decode=True,
                  row_programs=1):
    """shared_prefix_attention's real rows against the causal reference and (``vs_decode``)
    against decode_attention on the same arguments (its split count does not change the result
    beyond rounding, so the interpreter checks compare with it once per case to save time)."""
    from pymllm.layers.attention.triton_decode import decode_attention
    from pymllm.layers.attention.triton_shared_prefix import shared_prefix_attention

    q, k_buf, v_buf, r2t, req_idx, seq_lens = case
    sm_scale = q.shape[-1] ** -0.5
    got = shared_prefix_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, sm_scale, num_splits, window_left,
                                  out=torch.full_like(q, float("nan")), counters=counters,
                                  separate_merge=separate_merge, row_programs=row_programs)
    if counters is not None:
        assert not counters.any(), counters
    assert torch.isfinite(got).all(), "padding rows must come out finite too"
    positions = [int(n) - 1 for n in seq_lens[:new].cpu()]
    want = causal_reference(q[:new].cpu(), k_buf.cpu(), v_buf.cpu(), r2t.cpu(), int(req_idx[0]), positions,
                            sm_scale, window_left)
    torch.testing.assert_close(got[:new].cpu().float(), want.float(), rtol=tol, atol=tol)
    if not vs_decode:
        return got
    per_row = decode_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, sm_scale, num_splits, window_left,
                               out=torch.full_like(q, float("nan")))
    torch.testing.assert_close(got[:new].float(), per_row[:new].float(), rtol=tol, atol=tol)
    return got


def shared_prefix_checks() -> None:
    from pymllm.layers.attention.triton_decode import arrival_counters

    # GQA groups 1, 2, 4 (and 8: 17 + 2 rows x 8 heads = 256 query rows, two 128-row chunks);
    # 1 to 17 new tokens after 5 to 100 cached ones (more splits than blocks: empty splits);
    # padding rows at the end; a window that starts inside the prefix; the query rows in 1, 2
    # or 4 row programs (fewer where a slice would drop below 16; slices past the rows).
    counters = arrival_counters(4, 4, "cpu")
    cases = 0
    for hq, hkv in ((2, 2), (4, 2), (8, 2), (16, 2)):
        for new, pad in ((1, 0), (3, 1), (8, 0), (17, 2)):
            if hq == 16 and new < 17:
                continue
            for prefix in (5, 37, 100):
                case = make_extend_case(hq, hkv, 16, prefix, new, pad, torch.float16, "cpu", seed=hq + new + prefix)
                for num_splits, row_programs in ((1, 1), (2, 2), (4, 1), (4, 4)):
                    _check_shared(case, new, num_splits, -1, counters, tol=2e-3,
                                  vs_decode=num_splits == 2 and prefix == 100, row_programs=row_programs)
                    cases += 1
                _check_shared(case, new, 4, 9, counters, tol=2e-3, vs_decode=prefix == 37, row_programs=2)
                _check_shared(case, new, 2, 9, counters, tol=2e-3, separate_merge=True, vs_decode=False,
                              row_programs=4)
    assert cases == (3 * 4 * 3 + 3) * 4

    # Consecutive calls on one counter buffer with other lengths (as graph replays do): the
    # request grows, then a shorter one with more padding, then a window; the q shape stays.
    capacity = 120
    for hq, hkv in ((4, 2), (8, 2)):
        q, k_buf, v_buf, r2t, _, _ = make_extend_case(hq, hkv, 16, 90, 6, 2, torch.float16, "cpu", seed=1,
                                                      capacity=capacity)
        for num_splits, row_programs in ((2, 1), (4, 2)):
            for prefix, new, window in ((90, 6, -1), (100, 8, -1), (3, 2, -1), (40, 5, 7), (111, 8, 50)):
                req_idx = torch.tensor([2] * new + [0] * (8 - new))
                seq_lens = torch.tensor([prefix + i + 1 for i in range(new)] + [1] * (8 - new))
                _check_shared((q, k_buf, v_buf, r2t, req_idx, seq_lens), new, num_splits, window, counters,
                              tol=2e-3, vs_decode=num_splits == 2, row_programs=row_programs)

    # The most rows allowed with group 4: 256 query rows, two chunks; counters=None allocates.
    # With a 5-token window the later rows see nothing of split 0 (their merge starts at -inf).
    case = make_extend_case(8, 2, 16, 30, 64, 0, torch.float16, "cpu", seed=9)
    _check_shared(case, 64, 4, -1, None, tol=2e-3)
    _check_shared(case, 64, 4, 5, counters, tol=2e-3, vs_decode=False)
    _check_shared(case, 64, 2, 5, counters, tol=2e-3, vs_decode=False, row_programs=4)  # 64-row slices


def test_shared_prefix_under_interpreter() -> None:
    assert_passes_under_triton_interpreter("pymllm.tests.test_triton_shared_prefix", "shared_prefix_checks")


def test_shared_prefix_num_splits_rule() -> None:
    from pymllm.layers.attention.triton_shared_prefix import shared_prefix_num_splits

    assert shared_prefix_num_splits(8, 132) == 16  # Qwen3-8B on an H100/H200: 128 programs
    assert shared_prefix_num_splits(8, 132, row_programs=4) == 4
    assert shared_prefix_num_splits(8, 132, max_splits=8) == 8
    assert shared_prefix_num_splits(1, 132) == 64  # the cap
    assert shared_prefix_num_splits(4, 16) == 4
    assert shared_prefix_num_splits(64, 16) == 1
    for hkv in range(1, 80):
        for rp in (1, 2, 4):
            s = shared_prefix_num_splits(hkv, 132, row_programs=rp)
            assert s & (s - 1) == 0 and 1 <= s <= 64
            assert s == 1 or hkv * rp * s <= 132  # at most one program per SM
            assert s == 64 or hkv * rp * s * 2 > 132  # and not half of them idle


def test_shared_prefix_rejects_unsupported_shapes() -> None:
    from pymllm.layers.attention.triton_shared_prefix import shared_prefix_attention

    q, k_buf, v_buf, r2t, req_idx, seq_lens = make_extend_case(6, 4, 16, 5, 2, 0, torch.float16, "cpu")
    with pytest.raises(ValueError, match="not a multiple"):
        shared_prefix_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, 0.25, 1)
    q, k_buf, v_buf, r2t, req_idx, seq_lens = make_extend_case(4, 2, 16, 5, 2, 0, torch.float16, "cpu")
    with pytest.raises(ValueError, match="power of two"):
        shared_prefix_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, 0.25, 3)
    with pytest.raises(ValueError, match="counters"):  # one per KV head: 2 needed
        shared_prefix_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, 0.25, 2,
                                counters=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="counters"):  # 2 KV heads x 2 row programs
        shared_prefix_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, 0.25, 2, row_programs=2,
                                counters=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="row_programs"):
        shared_prefix_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, 0.25, 2, row_programs=3)
    with pytest.raises(ValueError, match="seq_lens"):
        shared_prefix_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens[:1], 0.25, 1)
    with pytest.raises(ValueError, match="at most 64 rows"):
        big = q[:1].expand(65, -1, -1).contiguous()
        shared_prefix_attention(big, k_buf, v_buf, r2t, req_idx.repeat(33), seq_lens.repeat(33), 0.25, 1)
    q, k_buf, v_buf, r2t, req_idx, seq_lens = make_extend_case(4, 2, 24, 5, 2, 0, torch.float16, "cpu")
    with pytest.raises(ValueError, match="head_dim"):
        shared_prefix_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, 0.25, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("new, pad", [(32, 0), (20, 12), (1, 31)])
def test_gpu_shared_prefix_matches_decode(new, pad) -> None:
    """Qwen3-8B shapes (32 query / 8 KV heads, head_dim 128, bf16): 32 rows after a 2000-token
    prefix, against the per-row decode kernel and the float64 causal reference, with the split
    rule's counts for 1, 2 and 4 row programs, one split, many splits, a window and the
    two-launch merge."""
    from pymllm.layers.attention.triton_decode import arrival_counters
    from pymllm.layers.attention.triton_shared_prefix import shared_prefix_num_splits

    case = make_extend_case(32, 8, 128, 2000, new, pad, torch.bfloat16, "cuda", seed=new)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    counters = arrival_counters(4, 8, "cuda")
    for row_programs in (1, 2, 4):
        splits = shared_prefix_num_splits(8, sms, row_programs=row_programs)
        _check_shared(case, new, splits, -1, counters, tol=2e-2, row_programs=row_programs)
    _check_shared(case, new, 1, -1, counters, tol=2e-2)
    _check_shared(case, new, 64, -1, counters, tol=2e-2)
    _check_shared(case, new, 8, 255, counters, tol=2e-2, row_programs=2)
    _check_shared(case, new, 16, -1, None, tol=2e-2, separate_merge=True)


@pytest.mark.gpu
@pytest.mark.parametrize("row_programs", [1, 4])
def test_gpu_shared_prefix_64_rows(row_programs) -> None:
    """64 rows x 4 heads: two 128-row chunks per program, or four 64-row slices."""
    from pymllm.layers.attention.triton_decode import arrival_counters

    case = make_extend_case(32, 8, 128, 700, 64, 0, torch.bfloat16, "cuda", seed=2)
    _check_shared(case, 64, 16, -1, arrival_counters(4, 8, "cuda"), tol=2e-2, row_programs=row_programs)


@pytest.mark.gpu
@pytest.mark.parametrize("row_programs", [1, 4])
def test_gpu_shared_prefix_graph_replay_follows_device_lengths(row_programs) -> None:
    """Captured once with 32 rows, replayed with other prefixes, row counts (the rest padding)
    and lengths written into the static buffers: no host work, counters back at zero, each
    replay equal to the reference and to an eager call, and the same lengths twice agree bit
    for bit (back-to-back replays also exercise the in-kernel merge's ordering)."""
    from pymllm.layers.attention.triton_decode import arrival_counters
    from pymllm.layers.attention.triton_shared_prefix import shared_prefix_attention, shared_prefix_num_splits

    rows, capacity = 32, 4200
    q, k_buf, v_buf, r2t, req_idx, seq_lens = make_extend_case(32, 8, 128, 2000, rows, 0, torch.bfloat16, "cuda",
                                                              seed=4, capacity=capacity)
    splits = shared_prefix_num_splits(8, torch.cuda.get_device_properties(0).multi_processor_count,
                                      row_programs=row_programs)
    sm_scale = 128**-0.5
    out = torch.empty_like(q)
    counters = arrival_counters(row_programs, 8, "cuda")
    args = (q, k_buf, v_buf, r2t, req_idx, seq_lens, sm_scale, splits)
    kw = dict(counters=counters, row_programs=row_programs)
    shared_prefix_attention(*args, out=out, **kw)  # compile first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        shared_prefix_attention(*args, out=out, **kw)
    results = {}
    for prefix, new in ((2000, 32), (4000, 32), (1, 7), (2000, 32), (130, 1), (3000, 17)):
        req_idx.copy_(torch.tensor([2] * new + [0] * (rows - new)))
        seq_lens.copy_(torch.tensor([prefix + i + 1 for i in range(new)] + [1] * (rows - new)))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert not counters.any()
        assert torch.isfinite(out).all()
        positions = [prefix + i for i in range(new)]
        want = causal_reference(q[:new].cpu(), k_buf.cpu(), v_buf.cpu(), r2t.cpu(), 2, positions, sm_scale)
        torch.testing.assert_close(out[:new].cpu().float(), want.float(), rtol=2e-2, atol=2e-2)
        eager = shared_prefix_attention(*args, **kw)
        torch.testing.assert_close(out[:new], eager[:new], rtol=0, atol=0)
        if (prefix, new) in results:
            assert torch.equal(results[(prefix, new)], out)
        results[(prefix, new)] = out.clone()
    # Many replays back to back (no sync between), alternating lengths: a merge that read a
    # stale partial would differ from the eager results.
    want = {}
    for prefix in (2000, 37):
        seq_lens.copy_(torch.tensor([prefix + i + 1 for i in range(rows)]))
        req_idx.fill_(2)
        want[prefix] = shared_prefix_attention(*args, **kw).clone()
    outs = []
    for i in range(200):
        prefix = (2000, 37)[i % 2]
        seq_lens.copy_(torch.arange(prefix + 1, prefix + rows + 1), non_blocking=True)
        graph.replay()
        outs.append((prefix, out.clone()))
    torch.cuda.synchronize()
    assert not counters.any()
    for prefix, got in outs:
        assert torch.equal(got, want[prefix]), prefix
