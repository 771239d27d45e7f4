"""gemv / gemv_w8a8 against their PyTorch references (GPU, marked gpu) and the wrappers'
argument checks (CPU)."""

from __future__ import annotations

import pytest
import torch
from mllm_kernel_test_utils import assert_bitwise_equal

from mllm_kernel import gemv, gemv_reference, gemv_w8a8, gemv_w8a8_reference

# Qwen3-8B and Qwen3-0.6B layer shapes (N, K), plus small ones with ragged warps and K tails.
SHAPES = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288), (1024, 2048), (4096, 1024), (131, 264), (7, 512)]
ROWS = (1, 2, 3, 8)
# One unit in the last place of the output dtype: both sides accumulate in float32 and round once.
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _inputs(m, n, k, dtype, seed, with_bias):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype=dtype, device="cuda")
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype=dtype, device="cuda")
    bias = torch.randn(n, generator=gen).to(dtype=dtype, device="cuda") if with_bias else None
    return x, w, bias


def _assert_close(actual, expected, dtype):
    assert torch.isfinite(actual).all(), "unwritten or non-finite outputs"
    error = (actual.float() - expected.float()).abs()
    bound = ULP[dtype] * (expected.float().abs() + expected.float().abs().mean())
    worst = (error - bound).max().item()
    assert worst <= 0, f"max excess error {worst:.3g} over {ULP[dtype]:.3g}-relative bound"


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_matches_reference(n, k, m, dtype) -> None:
    x, w, bias = _inputs(m, n, k, dtype, seed=n + k + m, with_bias=(n + m) % 2 == 0)
    _assert_close(gemv(x, w, bias), gemv_reference(x, w, bias), dtype)


@pytest.mark.gpu
def test_gemv_strided_rows_and_fresh_outputs() -> None:
    # x as every other row of a wider buffer (a view, as after a split); repeated calls must
    # not depend on what the allocator hands back.
    base = torch.randn(8, 2 * 4096, device="cuda", dtype=torch.bfloat16)
    x = base[:4, :4096]
    w = torch.randn(1000, 4096, device="cuda", dtype=torch.bfloat16) / 64
    expected = gemv_reference(x, w)
    for _ in range(3):
        torch.empty(4 * 1000 * 4, device="cuda").fill_(float("nan"))  # dirty the cache
        _assert_close(gemv(x, w), expected, torch.bfloat16)


def _int8_inputs(m, n, k, seed, with_bias, dtype):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_q = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8).to("cuda")
    x_scale = (torch.rand(m, 1, generator=gen) * 1e-2 + 1e-4).to("cuda")
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8).to("cuda")
    w_scale = (torch.rand(n, generator=gen) * 1e-3 + 1e-4).to("cuda")
    bias = torch.randn(n, generator=gen).to(dtype=dtype, device="cuda") if with_bias else None
    return x_q, x_scale, w, w_scale, bias


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [s for s in SHAPES if s[1] % 16 == 0])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_w8a8_matches_reference(n, k, m, dtype) -> None:
    x_q, x_scale, w, w_scale, bias = _int8_inputs(m, n, k, 3 * n + k + m, m % 2 == 1, dtype)
    # Exact integer products and the same float32 scaling order: bit for bit.
    got = gemv_w8a8(x_q, x_scale, w, w_scale, dtype, bias)
    assert_bitwise_equal(got, gemv_w8a8_reference(x_q, x_scale, w, w_scale, dtype, bias))


@pytest.mark.gpu
def test_gemv_w8a8_in_a_graph_and_zero_rows() -> None:
    x_q, x_scale, w, w_scale, _ = _int8_inputs(2, 512, 1024, 7, False, torch.bfloat16)
    x_q[1].zero_()
    expected = gemv_w8a8_reference(x_q, x_scale, w, w_scale, torch.bfloat16)
    gemv_w8a8(x_q, x_scale, w, w_scale, torch.bfloat16)  # compile/load outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv_w8a8(x_q, x_scale, w, w_scale, torch.bfloat16)
    graph.replay()
    torch.cuda.synchronize()
    assert_bitwise_equal(out, expected)
    assert (out[1] == 0).all()


def test_reference_matches_float64_product() -> None:
    x = torch.randn(3, 64, dtype=torch.float64)
    w = torch.randn(5, 64, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    xb, wb, bb = x.to(torch.bfloat16), w.to(torch.bfloat16), bias.to(torch.bfloat16)
    expected = (xb.double() @ wb.double().t() + bb.double()).to(torch.bfloat16)
    assert torch.equal(gemv_reference(xb, wb, bb), expected)


def test_w8a8_reference_is_the_scaled_integer_product() -> None:
    x_q = torch.randint(-128, 128, (2, 32), dtype=torch.int8)
    w = torch.randint(-128, 128, (4, 32), dtype=torch.int8)
    x_scale, w_scale = torch.rand(2, 1) / 10, torch.rand(4) / 100
    acc = (x_q.to(torch.int64) @ w.to(torch.int64).t()).float()
    expected = (acc * x_scale * w_scale).to(torch.bfloat16)
    assert torch.equal(gemv_w8a8_reference(x_q, x_scale, w, w_scale, torch.bfloat16), expected)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=torch.zeros(2, 16, dtype=torch.bfloat16), w=torch.zeros(4, 16, dtype=torch.bfloat16)),
         ValueError, "CUDA only"),
        (dict(x=torch.zeros(2, 16), w=torch.zeros(4, 16)), TypeError, "x must have dtype"),
        (dict(x=torch.zeros(9, 16, dtype=torch.half), w=torch.zeros(4, 16, dtype=torch.half)), ValueError, "1..8 rows"),
        (dict(x=torch.zeros(2, 12, dtype=torch.half), w=torch.zeros(4, 16, dtype=torch.half)), ValueError, "K of w"),
        (dict(x=torch.zeros(2, 16, dtype=torch.half), w=torch.zeros(4, 16, dtype=torch.half),
              bias=torch.zeros(5, dtype=torch.half)), ValueError, "N of w"),
    ],
)
def test_gemv_argument_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        gemv(**kwargs)


def test_gemv_w8a8_argument_errors() -> None:
    x_q, x_scale = torch.zeros(1, 32, dtype=torch.int8), torch.ones(1, 1)
    with pytest.raises(TypeError, match="w must have dtype int8"):
        gemv_w8a8(x_q, x_scale, torch.zeros(4, 32, dtype=torch.bfloat16), torch.zeros(4), torch.bfloat16)
    with pytest.raises(ValueError, match="w_scale.shape"):
        gemv_w8a8(x_q, x_scale, torch.zeros(4, 32, dtype=torch.int8), torch.zeros(3), torch.bfloat16)
    with pytest.raises(ValueError, match="one scale per row"):
        gemv_w8a8(x_q, torch.ones(2), torch.zeros(4, 32, dtype=torch.int8), torch.zeros(4), torch.bfloat16)
    with pytest.raises(TypeError, match="out_dtype"):
        gemv_w8a8(x_q, x_scale, torch.zeros(4, 32, dtype=torch.int8), torch.zeros(4), torch.float32)
