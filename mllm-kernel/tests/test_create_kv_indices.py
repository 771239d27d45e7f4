"""create_kv_indices against its PyTorch reference, on CPU (CI) and CUDA (marked gpu)."""

from __future__ import annotations

import pytest
import torch
from mllm_kernel_test_utils import assert_bitwise_equal

from mllm_kernel import create_kv_indices, create_kv_indices_reference


def make_batch(batch_size, max_context, pool_dtype, start_dtype, device, max_reqs=None, seed=0):
    """A random request table and batch; returns the kernel's arguments without the output."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    max_reqs = max_reqs or batch_size + 3
    req_to_token = torch.randint(0, 1 << 30, (max_reqs, max_context), generator=generator, dtype=torch.int32)
    pool = torch.randperm(max_reqs, generator=generator)[:batch_size]
    starts = torch.randint(0, max_context // 2 + 1, (batch_size,), generator=generator)
    room = max_context - starts
    lens = (torch.rand(batch_size, generator=generator) * (room + 1)).long().clamp(max=room)
    if batch_size > 1:
        lens[0] = 0  # an empty request in the middle of the batch
    indptr = torch.zeros(batch_size + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(lens, 0)
    kv_start_idx = None if start_dtype is None else starts.to(device=device, dtype=start_dtype)
    return (
        req_to_token.to(device),
        pool.to(device=device, dtype=pool_dtype),
        lens.to(device=device, dtype=torch.int32),
        indptr.to(device),
        kv_start_idx,
    )


def check_against_reference(args, slack: int = 5) -> None:
    """Outputs are poisoned with -1 and have a tail past kv_indptr[-1] that must stay untouched."""
    total = int(args[3][-1])
    out = torch.full((total + slack,), -1, dtype=torch.int32, device=args[0].device)
    expected = create_kv_indices_reference(*args, out.clone())
    assert create_kv_indices(*args, out) is out
    assert_bitwise_equal(out, expected)


def test_reference_on_a_hand_made_batch() -> None:
    req_to_token = torch.arange(40, dtype=torch.int32).view(4, 10)
    pool = torch.tensor([2, 0])
    lens = torch.tensor([3, 2], dtype=torch.int32)
    indptr = torch.tensor([0, 3, 5], dtype=torch.int32)
    start = torch.tensor([1, 7], dtype=torch.int32)
    expected = torch.tensor([21, 22, 23, 7, 8], dtype=torch.int32)
    assert torch.equal(create_kv_indices_reference(req_to_token, pool, lens, indptr, start), expected)
    assert torch.equal(create_kv_indices(req_to_token, pool, lens, indptr, start), expected)


# Two (pool dtype, start dtype) pairs on CPU: each is one compile, and CI time matters.
@pytest.mark.parametrize("pool_dtype, start_dtype", [(torch.int64, None), (torch.int32, torch.int64)])
@pytest.mark.parametrize("batch_size, max_context", [(0, 8), (1, 1), (5, 37), (16, 300)])
def test_cpu_matches_reference(batch_size, max_context, pool_dtype, start_dtype) -> None:
    check_against_reference(make_batch(batch_size, max_context, pool_dtype, start_dtype, "cpu", seed=batch_size))


def test_cpu_allocates_output_when_not_given() -> None:
    args = make_batch(4, 20, torch.int64, None, "cpu")
    out = create_kv_indices(*args)
    assert out.shape == (int(args[3][-1]),) and out.dtype == torch.int32
    assert_bitwise_equal(out, create_kv_indices_reference(*args))


@pytest.mark.parametrize(
    "position, index, value, message",
    [
        (1, 1, 7, r"req_pool_indices\[1\] = 7 is outside \[0, 7\)"),
        (4, 1, 8, r"request 1 reads tokens \[8, 11\) of a row of 10"),
        (5, None, None, r"request 1 writes kv_indices\[2, 5\) of 4"),
    ],
)
def test_cpu_rejects_out_of_range_indices(position, index, value, message) -> None:
    args = [
        torch.arange(70, dtype=torch.int32).view(7, 10),
        torch.tensor([0, 1]),
        torch.tensor([2, 3], dtype=torch.int32),
        torch.tensor([0, 2, 5], dtype=torch.int32),
        torch.tensor([0, 1], dtype=torch.int32),
        torch.empty(5, dtype=torch.int32),
    ]
    if index is None:
        args[position] = torch.empty(4, dtype=torch.int32)
    else:
        args[position][index] = value
    with pytest.raises(IndexError, match=message):
        create_kv_indices(*args)


@pytest.mark.parametrize(
    "position, replacement, error, message",
    [
        (0, lambda a: a[0].long(), TypeError, "req_to_token must have dtype int32"),
        (0, lambda a: a[0][0], ValueError, r"req_to_token must be 2-D \[max_reqs, max_context\]"),
        (0, lambda a: a[0].t().contiguous().t(), ValueError, "req_to_token rows must be dense"),
        (1, lambda a: a[1].float(), TypeError, "req_pool_indices must have dtype int32, int64"),
        (1, lambda a: a[1].repeat(2)[::2], ValueError, "req_pool_indices must be contiguous"),
        (2, lambda a: a[2].long(), TypeError, "page_kernel_lens must have dtype int32"),
        (2, lambda a: a[2][:2], ValueError, r"page_kernel_lens.shape\[0\] must be batch_size \(3\)"),
        (3, lambda a: a[3][:3], ValueError, r"kv_indptr.shape\[0\] must be batch_size \+ 1 \(4\)"),
        (4, lambda a: torch.zeros(2, dtype=torch.int32), ValueError, r"kv_start_idx.shape\[0\] must be batch_size"),
        (5, lambda a: torch.zeros(9, dtype=torch.int64), TypeError, "kv_indices_out must have dtype int32"),
        (5, lambda a: torch.zeros(9, dtype=torch.int32, device="meta"), ValueError, "kv_indices_out is on meta"),
    ],
)
def test_validation_errors(position, replacement, error, message) -> None:
    args = list(make_batch(3, 10, torch.int64, torch.int32, "cpu")) + [torch.zeros(30, dtype=torch.int32)]
    args[position] = replacement(args)
    with pytest.raises(error, match=message):
        create_kv_indices(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("start_dtype", [None, torch.int32, torch.int64])
@pytest.mark.parametrize("pool_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("batch_size, max_context", [(0, 16), (1, 1), (1, 5000), (7, 129), (64, 2048)])
def test_cuda_matches_reference(batch_size, max_context, pool_dtype, start_dtype) -> None:
    check_against_reference(make_batch(batch_size, max_context, pool_dtype, start_dtype, "cuda", seed=batch_size))


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay() -> None:
    """Captured once, replayed on new batch contents written into the same buffers."""
    batch_size, max_context, capacity = 8, 512, 8 * 512
    static = make_batch(batch_size, max_context, torch.int64, torch.int32, "cuda", max_reqs=32, seed=1)
    out = torch.full((capacity,), -1, dtype=torch.int32, device="cuda")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        create_kv_indices(*static, out)  # compile/load outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        create_kv_indices(*static, out)

    for seed in (2, 3):
        fresh = make_batch(batch_size, max_context, torch.int64, torch.int32, "cuda", max_reqs=32, seed=seed)
        for buffer, values in zip(static, fresh):
            buffer.copy_(values)
        out.fill_(-1)
        graph.replay()
        expected = create_kv_indices_reference(*static, torch.full_like(out, -1))
        assert_bitwise_equal(out, expected)
