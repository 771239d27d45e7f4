"""store_cache against its PyTorch reference, on CPU (CI) and CUDA (marked gpu)."""

from __future__ import annotations

import pytest
import torch
from mllm_kernel_test_utils import assert_bitwise_equal, poisoned_like

from mllm_kernel import store_cache, store_cache_reference


def make_inputs(num_tokens, num_heads, head_dim, num_slots, dtype, index_dtype, device, kv_stride_heads=None):
    """Random K/V (optionally slices of a wider fused tensor), poisoned caches, distinct slots."""
    generator = torch.Generator(device="cpu").manual_seed(num_tokens * 1000 + num_heads * 10 + head_dim)
    row = num_heads * head_dim
    width = row if kv_stride_heads is None else kv_stride_heads * head_dim
    fused = torch.randn(num_tokens, 2 * width, generator=generator).to(dtype=dtype, device=device)
    k = fused[:, :row].view(num_tokens, num_heads, head_dim)
    v = fused[:, width : width + row].view(num_tokens, num_heads, head_dim)
    k_cache = torch.full((num_slots, num_heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = poisoned_like(k_cache)
    loc = torch.randperm(num_slots, generator=generator)[:num_tokens].to(device=device, dtype=index_dtype)
    return k, v, k_cache, v_cache, loc


def check_against_reference(k, v, k_cache, v_cache, loc) -> None:
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    store_cache_reference(k, v, expected_k, expected_v, loc)
    store_cache(k, v, k_cache, v_cache, loc)
    assert_bitwise_equal(k_cache, expected_k)
    assert_bitwise_equal(v_cache, expected_v)


# Few (dtype, index dtype) pairs on CPU: each pair is one compile, and CI time matters.
@pytest.mark.parametrize(
    "dtype, index_dtype, num_tokens, num_heads, head_dim",
    [
        (torch.float32, torch.int64, 5, 4, 16),
        (torch.bfloat16, torch.int32, 1, 2, 64),
        (torch.float16, torch.int64, 0, 8, 128),
        (torch.float32, torch.int64, 9, 3, 5),
    ],
)
def test_cpu_matches_reference(dtype, index_dtype, num_tokens, num_heads, head_dim) -> None:
    check_against_reference(*make_inputs(num_tokens, num_heads, head_dim, 32, dtype, index_dtype, "cpu"))


def test_cpu_strided_inputs_and_cache_views() -> None:
    # K/V as slices of a fused projection; caches as one layer of a [slots, layers, H, D] pool.
    k, v, _, _, loc = make_inputs(6, 2, 8, 16, torch.float32, torch.int64, "cpu", kv_stride_heads=5)
    pool = torch.full((16, 3, 2, 8), float("nan"))
    check_against_reference(k, v, pool[:, 1], pool[:, 2], loc)
    assert torch.isnan(pool[:, 0]).all()


def test_cpu_rejects_out_of_range_slot() -> None:
    k, v, k_cache, v_cache, loc = make_inputs(3, 2, 4, 8, torch.float32, torch.int64, "cpu")
    loc[1] = 8
    with pytest.raises(IndexError, match=r"out_cache_loc\[1\] = 8 is outside \[0, 8\)"):
        store_cache(k, v, k_cache, v_cache, loc)


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda a: a.update(k=a["k"].int()), TypeError, "k must have dtype float16, bfloat16, float32"),
        (lambda a: a.update(v=a["v"].half()), TypeError, "v has dtype torch.float16 but k has torch.float32"),
        (lambda a: a.update(k=a["k"][0]), ValueError, r"k must be 3-D \[num_tokens, num_heads, head_dim\]"),
        (lambda a: a.update(k_cache=a["k_cache"][:, :1]), ValueError, r"k_cache.shape\[1\] must be num_heads"),
        (lambda a: a.update(v_cache=a["v_cache"][:4]), ValueError, r"v_cache.shape\[0\] must be num_slots"),
        (lambda a: a.update(loc=a["loc"].float()), TypeError, "out_cache_loc must have dtype int32, int64"),
        (lambda a: a.update(loc=a["loc"][:2]), ValueError, r"out_cache_loc.shape\[0\] must be num_tokens of k \(3\)"),
        (lambda a: a.update(loc=a["loc"].repeat(2)[::2]), ValueError, "out_cache_loc must be contiguous"),
        (
            lambda a: a.update(k=a["k"].transpose(1, 2).contiguous().transpose(1, 2)),
            ValueError,
            "k must be dense in its last 2 dims",
        ),
        (lambda a: a.update(v=a["v"].to("meta")), ValueError, "v is on meta but k is on cpu"),
        (lambda a: a.update(k=a["k"].tolist()), TypeError, "k must be a torch.Tensor, got list"),
    ],
)
def test_validation_errors(mutate, error, message) -> None:
    k, v, k_cache, v_cache, loc = make_inputs(3, 2, 4, 8, torch.float32, torch.int64, "cpu")
    args = {"k": k, "v": v, "k_cache": k_cache, "v_cache": v_cache, "loc": loc}
    mutate(args)
    with pytest.raises(error, match=message):
        store_cache(*args.values())


GPU_SHAPES = [
    (0, 8, 128),  # empty batch
    (1, 8, 128),  # decode step, 16-byte path
    (7, 2, 64),
    (257, 8, 128),
    (1000, 32, 128),  # wide rows: several warps per token
    (5, 3, 5),  # row bytes not a multiple of 16: narrower accesses
    (17, 1, 8),
]


@pytest.mark.gpu
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_tokens, num_heads, head_dim", GPU_SHAPES)
def test_cuda_matches_reference(num_tokens, num_heads, head_dim, dtype, index_dtype) -> None:
    inputs = make_inputs(num_tokens, num_heads, head_dim, 4096, dtype, index_dtype, "cuda")
    check_against_reference(*inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_stride_heads", [9, 8])  # odd offset: unaligned rows; even: aligned
def test_cuda_strided_inputs_and_cache_views(kv_stride_heads) -> None:
    k, v, _, _, loc = make_inputs(33, 4, 4, 512, torch.float16, torch.int64, "cuda", kv_stride_heads)
    pool = torch.full((512, 3, 4, 4), float("nan"), dtype=torch.float16, device="cuda")
    check_against_reference(k, v, pool[:, 1], pool[:, 2], loc)
    assert torch.isnan(pool[:, 0]).all()


@pytest.mark.gpu
def test_cuda_runs_on_current_stream_and_in_graphs() -> None:
    k, v, k_cache, v_cache, loc = make_inputs(64, 8, 128, 1024, torch.bfloat16, torch.int64, "cuda")
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    # Warm up (compile/load) on a side stream, as torch recommends before capture.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        store_cache(k, v, k_cache, v_cache, loc)
    torch.cuda.current_stream().wait_stream(stream)
    # Capture fails if the kernel is launched on any stream but torch's current one.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        store_cache(k, v, k_cache, v_cache, loc)
    # New values in the captured input buffers must land on replay.
    k.copy_(torch.randn_like(k))
    v.copy_(torch.randn_like(v))
    loc.copy_(torch.randperm(1024, device="cuda")[:64])
    graph.replay()
    store_cache_reference(k, v, expected_k, expected_v, loc)
    torch.cuda.synchronize()
    k_rows, v_rows = k_cache[loc], v_cache[loc]
    assert_bitwise_equal(k_rows, expected_k[loc])
    assert_bitwise_equal(v_rows, expected_v[loc])
