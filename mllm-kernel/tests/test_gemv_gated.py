"""gemv_gated_silu (the gate/up GEMV with the SiLU-and-mul as its epilogue) against its PyTorch
reference and against the plain GEMV it fuses (GPU, marked gpu); the reference and the argument
checks on CPU."""

from __future__ import annotations

import pytest
import torch

from mllm_kernel.cuda.jit.gemv_kernels import (
    GATED_TILINGS,
    silu_mul_reference,
    gemv,
    gemv_gated_silu,
    gemv_gated_silu_reference,
    gemv_reference,
)

# (N outputs, K): Qwen3-8B and Qwen3-0.6B gate_up (w is [2N, K]), and ragged ones (a partial
# last warp, a K tail).
SHAPES = [(12288, 4096), (3072, 1024), (131, 264), (7, 512)]
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _inputs(m, n, k, dtype, seed, with_bias):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(2 * n, k, generator=gen) / k**0.5).to(dtype)
    bias = torch.randn(2 * n, generator=gen).to(dtype) if with_bias else None
    return x, w, bias


def _to_cuda(*tensors):
    return [None if t is None else t.cuda() for t in tensors]


def _poison(m, n, dtype):
    # The output comes from the caching allocator: hand it a NaN-filled block first, so an
    # unwritten element shows up.
    torch.full((m, n), float("nan"), dtype=dtype, device="cuda")


def _assert_close(actual, expected, dtype):
    # g and u are rounded to the dtype from float32 sums taken in another order than the
    # reference's, so either may sit one unit in the last place away; silu(g) * u then moves by
    # about as much (plus the approximate exp / division of the SiLU).
    assert torch.isfinite(actual).all(), "unwritten or non-finite outputs"
    e = expected.float()
    bound = 4 * ULP[dtype] * (e.abs() + e.abs().mean())
    assert ((actual.float() - e).abs() <= bound).all()
    assert (actual == expected).float().mean().item() > 0.9


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("m", (1, 2, 3, 8))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_gemv_matches_reference(n, k, m, dtype) -> None:
    x, w, bias = _to_cuda(*_inputs(m, n, k, dtype, seed=n + k + m, with_bias=m % 2 == 0))
    _poison(m, n, dtype)
    _assert_close(gemv_gated_silu(x, w, bias), gemv_gated_silu_reference(x, w, bias), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("tiling", GATED_TILINGS)
@pytest.mark.parametrize("m", (1, 5))
def test_every_tiling_is_the_plain_gemv_then_silu_mul(tiling, m) -> None:
    # The dispatcher may pick any tiling. Each row's dot product is summed in the order of the
    # plain GEMV with the same split-K flag, so g and u are that GEMV's outputs bit for bit and
    # only the SiLU-and-mul (Triton's approximate exp / division vs PyTorch's) can differ.
    plain = 14 if tiling >= 10 else 4
    for n, k in ((12288, 4096), (131, 264)):
        x, w, bias = _to_cuda(*_inputs(m, n, k, torch.bfloat16, seed=tiling + m + n, with_bias=True))
        _poison(m, n, torch.bfloat16)
        got = gemv_gated_silu(x, w, bias, _tiling=tiling)
        want = silu_mul_reference(gemv(x, w, bias, _tiling=plain))
        e = want.float()
        assert ((got.float() - e).abs() <= 2 * ULP[torch.bfloat16] * e.abs() + 2.0**-126).all()


@pytest.mark.gpu
def test_gated_gemv_in_a_cuda_graph() -> None:
    x, w, bias = _to_cuda(*_inputs(2, 3072, 1024, torch.bfloat16, seed=3, with_bias=False))
    expected = gemv_gated_silu(x, w)  # compile / load outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv_gated_silu(x, w)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


def test_reference_is_the_gemv_then_silu_mul() -> None:
    x, w, bias = _inputs(3, 24, 64, torch.bfloat16, seed=0, with_bias=True)
    gate_up = gemv_reference(x, w, bias)
    g, u = gate_up.float().chunk(2, dim=-1)
    silu = (g * torch.sigmoid(g)).to(torch.bfloat16).float()
    expected = (silu * u).to(torch.bfloat16)
    got = gemv_gated_silu_reference(x, w, bias)
    assert got.shape == (3, 24)
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=torch.zeros(2, 16, dtype=torch.bfloat16), w=torch.zeros(4, 16, dtype=torch.bfloat16)),
         ValueError, "CUDA only"),
        (dict(x=torch.zeros(2, 16, dtype=torch.half), w=torch.zeros(5, 16, dtype=torch.half)), ValueError,
         "stack gate and up rows"),
        (dict(x=torch.zeros(2, 16, dtype=torch.half), w=torch.zeros(4, 16, dtype=torch.half),
              bias=torch.zeros(2, dtype=torch.half)), ValueError, "N of w"),
        (dict(x=torch.zeros(2, 16, dtype=torch.half), w=torch.zeros(4, 16, dtype=torch.half), _tiling=1),
         ValueError, "_tiling must be 0 or one of"),
        (dict(x=torch.zeros(9, 16, dtype=torch.half), w=torch.zeros(4, 16, dtype=torch.half)), ValueError,
         "1..8 rows"),
        (dict(x=torch.zeros(2, 16), w=torch.zeros(4, 16)), TypeError, "x must have dtype"),
    ],
)
def test_gated_gemv_argument_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        gemv_gated_silu(**kwargs)
