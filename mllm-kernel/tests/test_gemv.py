"""gemv / gemv_w8a8 and the fused-prologue entries (rmsnorm_gemv, silu_mul_gemv,
gemv_w8a8_dynamic) against their PyTorch references (GPU, marked gpu), the references themselves
and the wrappers' argument checks (CPU)."""

from __future__ import annotations

import pytest
import torch
from mllm_kernel_test_utils import assert_bitwise_equal

import torch.nn.functional as F
from mllm_kernel import gemv, gemv_reference, gemv_w8a8, gemv_w8a8_reference
from mllm_kernel.cuda.jit.gemv_kernels import (
    TILINGS,
    gemv_w8a8_dynamic,
    gemv_w8a8_dynamic_reference,
    rmsnorm_gemv,
    rmsnorm_gemv_reference,
    silu_mul_gemv,
    silu_mul_gemv_reference,
)

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
@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("m", (1, 3, 8))
def test_every_forced_tiling_matches_reference(tiling, m) -> None:
    # The dispatcher measures every tiling and may pick any; each covers all rows and all of K.
    for n, k in ((6144, 4096), (131, 264), (1000, 12288)):
        x, w, bias = _inputs(m, n, k, torch.bfloat16, seed=tiling * 7 + m + n, with_bias=True)
        _assert_close(gemv(x, w, bias, _tiling=tiling), gemv_reference(x, w, bias), torch.bfloat16)
        if k % 16 == 0:
            x_q, x_scale, wq, w_scale, qbias = _int8_inputs(m, n, k, tiling + m + k, True, torch.bfloat16)
            assert_bitwise_equal(gemv_w8a8(x_q, x_scale, wq, w_scale, torch.bfloat16, qbias, _tiling=tiling),
                                 gemv_w8a8_reference(x_q, x_scale, wq, w_scale, torch.bfloat16, qbias))


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
        (dict(x=torch.zeros(2, 16, dtype=torch.half), w=torch.zeros(4, 16, dtype=torch.half), _tiling=12),
         ValueError, "_tiling must be 0 or one of"),
        (dict(x=torch.zeros(2, 16, dtype=torch.half), w=torch.zeros(4, 16, dtype=torch.half), _tiling=True),
         ValueError, "_tiling must be"),
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
    with pytest.raises(ValueError, match="_tiling must be 0 or one of"):
        gemv_w8a8(x_q, x_scale, torch.zeros(4, 32, dtype=torch.int8), torch.zeros(4), torch.bfloat16, _tiling=3)


# ---------------------------------------------------------------- fused prologues
# Qwen3-0.6B (qkv, gate_up, down, o) and Qwen3-8B (qkv, gate_up, down) layers, plus ragged ones
# (a partial last warp, K tails; K = 264 is not a multiple of 16, so dense only).
FUSED_SHAPES = [(4096, 1024), (6144, 1024), (1024, 3072), (1024, 2048), (6144, 4096), (24576, 4096),
                (4096, 12288), (131, 264), (7, 512)]
ALL_ROWS = tuple(range(1, 9))
EPS = 1e-6


def _poison_allocator(*shapes_and_dtypes) -> None:
    # The wrappers allocate their outputs: fill the blocks the caching allocator will hand them
    # with NaN first, so an unwritten output element shows up as NaN.
    for shape, dtype in shapes_and_dtypes:
        torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def _fused_inputs(m, n, k, dtype, seed, *, width=1, residual=False, bias=False, int8=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, width * k, generator=gen, device="cuda").to(dtype)
    res = torch.randn(m, k, generator=gen, device="cuda").to(dtype) if residual else None
    norm_w = (1 + 0.1 * torch.randn(k, generator=gen, device="cuda")).to(dtype)
    if int8:
        w = torch.randint(-128, 128, (n, k), generator=gen, device="cuda", dtype=torch.int8)
    else:
        w = (torch.randn(n, k, generator=gen, device="cuda") / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen, device="cuda").to(dtype) if bias else None
    w_scale = torch.rand(n, generator=gen, device="cuda") * 1e-3 + 1e-4
    return x, res, norm_w, w, b, w_scale


def _flags(m):
    # Every shape meets all four (residual, bias) combinations over m = 1..8.
    return m % 2 == 0, (m // 2) % 2 == 1


def _assert_within_one_ulp(actual, expected, dtype):
    # The fused activation may differ from the PyTorch reference's by one unit in the last place
    # (float32 sum order of the RMSNorm; Triton's approximate exp / division in the SiLU).
    assert torch.isfinite(actual).all()
    e = expected.float()
    ulp = torch.where(e == 0, torch.full_like(e, 2.0**-126), e.abs() * 2 * ULP[dtype])
    assert ((actual.float() - e).abs() <= ulp).all()
    assert (actual == expected).float().mean().item() > 0.99


def _kernel_activation(x, prologue, res, norm_w, k):
    # The activation a fused kernel computes, read back through the dense fused GEMV with the
    # identity matrix as weights: y[m, n] = a[m, n] * 1 exactly. Every kernel of one prologue
    # computes a bit for bit alike (the statistics are summed in one fixed order whatever the
    # format or tiling), so this is also the a that the int8 kernels quantize.
    eye = torch.eye(k, dtype=x.dtype, device=x.device)
    if prologue == "rmsnorm":
        return rmsnorm_gemv(x, res, norm_w, EPS, eye)[0]
    return silu_mul_gemv(x, eye)


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", FUSED_SHAPES)
@pytest.mark.parametrize("m", ALL_ROWS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_gemv_matches_reference(n, k, m, dtype) -> None:
    with_res, with_bias = _flags(m)
    x, res, norm_w, w, bias, _ = _fused_inputs(m, n, k, dtype, seed=n + k + m, residual=with_res, bias=with_bias)
    _poison_allocator(((m, n), dtype), ((m, k), dtype))
    y, res_out = rmsnorm_gemv(x, res, norm_w, EPS, w, bias)
    y_ref, res_ref = rmsnorm_gemv_reference(x, res, norm_w, EPS, w, bias)
    _assert_close(y, y_ref, dtype)
    if with_res:
        assert_bitwise_equal(res_out, res_ref)
        assert res_out.data_ptr() not in (x.data_ptr(), res.data_ptr())
    else:
        assert res_out is None


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", FUSED_SHAPES)
@pytest.mark.parametrize("m", ALL_ROWS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_mul_gemv_matches_reference(n, k, m, dtype) -> None:
    x, _, _, w, bias, _ = _fused_inputs(m, n, k, dtype, seed=2 * n + k + m, width=2, bias=_flags(m)[1])
    _poison_allocator(((m, n), dtype))
    _assert_close(silu_mul_gemv(x, w, bias), silu_mul_gemv_reference(x, w, bias), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("prologue", ["rmsnorm", "silu_mul"])
@pytest.mark.parametrize("k", [1024, 3072, 4096, 264])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_activation_within_one_ulp_of_reference(prologue, k, dtype) -> None:
    m = 8
    x, res, norm_w, _, _, _ = _fused_inputs(m, 1, k, dtype, seed=k + 11, width=2 if prologue == "silu_mul" else 1,
                                            residual=True)
    a = _kernel_activation(x, prologue, res, norm_w, k)
    if prologue == "rmsnorm":
        expected = rmsnorm_gemv_reference(x, res, norm_w, EPS, torch.eye(k, dtype=dtype, device="cuda"))[0]
    else:
        expected = silu_mul_gemv_reference(x, torch.eye(k, dtype=dtype, device="cuda"))
    _assert_within_one_ulp(a, expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("prologue", ["none", "rmsnorm", "silu_mul"])
@pytest.mark.parametrize("n, k", [s for s in FUSED_SHAPES if s[1] % 16 == 0])
@pytest.mark.parametrize("m", ALL_ROWS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_w8a8_dynamic_is_quantize_then_gemv_w8a8(prologue, n, k, m, dtype) -> None:
    with_res, with_bias = _flags(m)
    with_res = with_res and prologue == "rmsnorm"
    x, res, norm_w, w, bias, w_scale = _fused_inputs(m, n, k, dtype, seed=3 * n + k + m, int8=True, bias=with_bias,
                                                     width=2 if prologue == "silu_mul" else 1, residual=with_res)
    kwargs = dict(prologue=prologue, residual=res, norm_weight=norm_w if prologue == "rmsnorm" else None, eps=EPS)
    _poison_allocator(((m, n), dtype), ((m, k), dtype))
    got = gemv_w8a8_dynamic(x, w, w_scale, dtype, bias, **kwargs)
    if prologue == "rmsnorm":
        got, res_out = got
        expected_res = rmsnorm_gemv_reference(x, res, norm_w, EPS, w[:1].to(dtype))[1]
        if with_res:
            assert_bitwise_equal(res_out, expected_res)
        else:
            assert res_out is None
    # Bit for bit: quantizing is exact given the activation (an absolute maximum, a true
    # division, ties to even), and so are the integer products. Compared on the kernel's own
    # activation (see _kernel_activation): a one-ulp difference from the PyTorch prologue in one
    # element could move its quantized value by one step.
    a = x if prologue == "none" else _kernel_activation(x, prologue, res, norm_w, k)
    assert_bitwise_equal(got, gemv_w8a8_dynamic_reference(a, w, w_scale, dtype, bias))


@pytest.mark.gpu
def test_fused_entries_in_a_graph_and_strided_rows() -> None:
    # x and residual as row views of wider buffers; replays of a captured graph recompute.
    dtype, m, n, k = torch.bfloat16, 3, 1000, 2048
    base = torch.randn(m, 2 * k, device="cuda").to(dtype)
    res_base = torch.randn(m, 3 * k, device="cuda").to(dtype)
    x, res = base[:, :k], res_base[:, k:2 * k]
    norm_w = torch.rand(k, device="cuda").to(dtype)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    qw = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8)
    w_scale = torch.rand(n, device="cuda") / 100
    calls = [lambda: rmsnorm_gemv(x, res, norm_w, EPS, w),
             lambda: silu_mul_gemv(base, w),
             lambda: gemv_w8a8_dynamic(x, qw, w_scale, dtype, prologue="rmsnorm", residual=res, norm_weight=norm_w)]
    expected = [call() for call in calls]  # also compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call() for call in calls]
    base.copy_(torch.randn_like(base))
    graph.replay()
    torch.cuda.synchronize()
    fresh = [call() for call in calls]
    for out, new, old in zip(outs, fresh, expected):
        for o, f, e in zip(out if isinstance(out, tuple) else (out,), new if isinstance(new, tuple) else (new,),
                           old if isinstance(old, tuple) else (old,)):
            assert_bitwise_equal(o, f)
    _assert_close(fresh[0][0], rmsnorm_gemv_reference(x, res, norm_w, EPS, w)[0], dtype)


# ---------------------------------------------------------------- references and checks (CPU)


def test_rmsnorm_gemv_reference_is_norm_then_matmul() -> None:
    # Composed the way the HF models write it: normalise in float32 (mean of squares: K is a
    # power of two, so the mean equals the sum / K), round, multiply by the weight in bf16.
    gen = torch.Generator().manual_seed(0)
    dtype, k = torch.bfloat16, 64
    x, res = torch.randn(3, k, generator=gen).to(dtype), torch.randn(3, k, generator=gen).to(dtype)
    norm_w, w = torch.randn(k, generator=gen).to(dtype), torch.randn(5, k, generator=gen).to(dtype)
    bias = torch.randn(5, generator=gen).to(dtype)
    h = x + res
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype)
    a = norm_w * normed
    y, res_out = rmsnorm_gemv_reference(x, res, norm_w, EPS, w, bias)
    assert torch.equal(res_out, h)
    assert torch.equal(y, gemv_reference(a, w, bias))
    y0, none = rmsnorm_gemv_reference(x, None, norm_w, EPS, w)
    assert none is None
    assert torch.equal(y0, gemv_reference(norm_w * (x.float() * torch.rsqrt(
        x.float().pow(2).mean(-1, keepdim=True) + EPS)).to(dtype), w))


def test_silu_mul_gemv_reference_is_silu_times_up_then_matmul() -> None:
    gen = torch.Generator().manual_seed(1)
    dtype, k = torch.float16, 48
    x, w = torch.randn(2, 2 * k, generator=gen).to(dtype), torch.randn(4, k, generator=gen).to(dtype)
    gate, up = x[:, :k], x[:, k:]
    # silu(gate) rounded to fp16 before the multiply, as F.silu(gate) * up does; F.silu's float32
    # exp may differ from torch.exp's in the last bit, hence one ulp of slack on a.
    a = F.silu(gate.float()).to(dtype) * up
    expected = silu_mul_gemv_reference(x, torch.eye(k, dtype=dtype))
    assert (expected.float() - a.float()).abs().le(a.float().abs() * 2**-10).all()
    assert torch.equal(silu_mul_gemv_reference(x, w), gemv_reference(expected, w))


def test_w8a8_dynamic_reference_quantizes_per_token_with_ties_to_even() -> None:
    # scale = 127.5 / 127.5 = 1: q = round_half_even(a), clamped to [-128, 127].
    a = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 127.5, -127.5, 3.0]], dtype=torch.bfloat16)
    w = torch.eye(8, dtype=torch.int8)
    y = gemv_w8a8_dynamic_reference(a, w, torch.ones(8), torch.bfloat16)
    assert y.float().tolist() == [[0.0, 2.0, 2.0, 0.0, -2.0, 127.0, -128.0, 3.0]]
    # A zero row takes the 1e-10 floor and quantizes to zeros.
    zero = gemv_w8a8_dynamic_reference(torch.zeros(1, 8, dtype=torch.bfloat16), w, torch.ones(8), torch.bfloat16)
    assert (zero == 0).all()


def test_w8a8_dynamic_reference_composes_the_prologues() -> None:
    gen = torch.Generator().manual_seed(2)
    dtype, k = torch.bfloat16, 32
    x, res = torch.randn(2, k, generator=gen).to(dtype), torch.randn(2, k, generator=gen).to(dtype)
    norm_w = torch.randn(k, generator=gen).to(dtype)
    w = torch.randint(-128, 128, (3, k), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(3, generator=gen)
    y, res_out = gemv_w8a8_dynamic_reference(x, w, w_scale, dtype, prologue="rmsnorm", residual=res,
                                             norm_weight=norm_w, eps=EPS)
    a, h = rmsnorm_gemv_reference(x, res, norm_w, EPS, torch.eye(k, dtype=dtype))
    assert torch.equal(res_out, h)
    assert torch.equal(y, gemv_w8a8_dynamic_reference(a, w, w_scale, dtype))
    x2 = torch.randn(2, 2 * k, generator=gen).to(dtype)
    a2 = silu_mul_gemv_reference(x2, torch.eye(k, dtype=dtype))
    assert torch.equal(gemv_w8a8_dynamic_reference(x2, w, w_scale, dtype, prologue="silu_mul"),
                       gemv_w8a8_dynamic_reference(a2, w, w_scale, dtype))


def _cpu(m=2, k=32, dtype=torch.bfloat16, width=1):
    return torch.zeros(m, width * k, dtype=dtype)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: rmsnorm_gemv(_cpu(), None, torch.ones(32, dtype=torch.bfloat16), EPS,
                              torch.zeros(4, 32, dtype=torch.bfloat16)), ValueError, "CUDA only"),
        (lambda: rmsnorm_gemv(_cpu(), None, torch.ones(16, dtype=torch.bfloat16), EPS,
                              torch.zeros(4, 32, dtype=torch.bfloat16)), ValueError, "norm_weight.shape"),
        (lambda: rmsnorm_gemv(_cpu(), None, torch.ones(32, dtype=torch.half), EPS,
                              torch.zeros(4, 32, dtype=torch.bfloat16)), TypeError, "norm_weight must have dtype"),
        (lambda: rmsnorm_gemv(_cpu(), None, None, EPS, torch.zeros(4, 32, dtype=torch.bfloat16)),
         ValueError, "needs norm_weight"),
        (lambda: rmsnorm_gemv(_cpu(), _cpu(m=3), torch.ones(32, dtype=torch.bfloat16), EPS,
                              torch.zeros(4, 32, dtype=torch.bfloat16)), ValueError, "residual must have x's shape"),
        (lambda: rmsnorm_gemv(_cpu(), _cpu(dtype=torch.half), torch.ones(32, dtype=torch.bfloat16), EPS,
                              torch.zeros(4, 32, dtype=torch.bfloat16)), TypeError, "residual must have dtype"),
        (lambda: rmsnorm_gemv(_cpu(), _cpu(k=64)[:, :32], torch.ones(32, dtype=torch.bfloat16), EPS,
                              torch.zeros(4, 32, dtype=torch.bfloat16)), ValueError, "CUDA only"),
        (lambda: rmsnorm_gemv(_cpu(k=40)[:, 4:36], None, torch.ones(32, dtype=torch.bfloat16), EPS,
                              torch.zeros(4, 32, dtype=torch.bfloat16)), ValueError, "16-byte aligned"),
        (lambda: rmsnorm_gemv(_cpu(k=36)[:, :32], None, torch.ones(32, dtype=torch.bfloat16), EPS,
                              torch.zeros(4, 32, dtype=torch.bfloat16)), ValueError, "row stride"),
        (lambda: rmsnorm_gemv(_cpu(), _cpu(k=36)[:, :32], torch.ones(32, dtype=torch.bfloat16), EPS,
                              torch.zeros(4, 32, dtype=torch.bfloat16)), ValueError, "residual needs"),
        (lambda: rmsnorm_gemv(_cpu(), None, torch.ones(32, dtype=torch.bfloat16), -1.0,
                              torch.zeros(4, 32, dtype=torch.bfloat16)), ValueError, "eps"),
        (lambda: rmsnorm_gemv(_cpu(m=9), None, torch.ones(32, dtype=torch.bfloat16), EPS,
                              torch.zeros(4, 32, dtype=torch.bfloat16)), ValueError, "1..8 rows"),
        (lambda: silu_mul_gemv(_cpu(), torch.zeros(4, 32, dtype=torch.bfloat16)), ValueError, "2 \\* K of w"),
        (lambda: silu_mul_gemv(_cpu(width=2), torch.zeros(4, 32, dtype=torch.half)), TypeError, "w must have dtype"),
        (lambda: silu_mul_gemv(_cpu(width=2), torch.zeros(4, 32, dtype=torch.bfloat16)), ValueError, "CUDA only"),
        (lambda: silu_mul_gemv(_cpu(k=12, width=2), torch.zeros(4, 12, dtype=torch.bfloat16)),
         ValueError, "multiple of 8"),
        (lambda: gemv_w8a8_dynamic(_cpu(), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4), torch.bfloat16),
         ValueError, "CUDA only"),
        (lambda: gemv_w8a8_dynamic(_cpu(), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4), torch.half),
         TypeError, "out_dtype"),
        (lambda: gemv_w8a8_dynamic(_cpu(dtype=torch.int8), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4),
                                   torch.int8), TypeError, "x must have dtype"),
        (lambda: gemv_w8a8_dynamic(_cpu(), torch.zeros(4, 32, dtype=torch.bfloat16), torch.ones(4), torch.bfloat16),
         TypeError, "w must have dtype int8"),
        (lambda: gemv_w8a8_dynamic(_cpu(k=24), torch.zeros(4, 24, dtype=torch.int8), torch.ones(4), torch.bfloat16),
         ValueError, "multiple of 16"),
        (lambda: gemv_w8a8_dynamic(_cpu(), torch.zeros(4, 32, dtype=torch.int8), torch.ones(3), torch.bfloat16),
         ValueError, "w_scale.shape"),
        (lambda: gemv_w8a8_dynamic(_cpu(), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4), torch.bfloat16,
                                   prologue="gelu"), ValueError, "prologue must be one of"),
        (lambda: gemv_w8a8_dynamic(_cpu(width=2), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4), torch.bfloat16,
                                   prologue="silu_mul", residual=_cpu()), ValueError, "belong to the rmsnorm"),
        (lambda: gemv_w8a8_dynamic(_cpu(), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4), torch.bfloat16,
                                   prologue="rmsnorm"), ValueError, "needs norm_weight"),
        (lambda: gemv_w8a8_dynamic(_cpu(), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4), torch.bfloat16,
                                   prologue="rmsnorm", norm_weight=torch.ones(32, dtype=torch.bfloat16),
                                   residual=_cpu()), ValueError, "CUDA only"),
    ],
)
def test_fused_argument_errors(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


def _negative_maximum():
    # amax (exact in bf16) for which amax / 127.5 correctly rounded is not amax * fl(1 / 127.5),
    # and -amax / scale is exactly -127.5 (ties to even: -128) only with the divided scale.
    for v in range(64, 256):
        amax = torch.tensor(v / 64, dtype=torch.float32)
        divided = (amax.double() / 127.5).float()
        if (amax * torch.tensor(1 / 127.5)).item() != divided.item() and \
                (-amax.double() / divided.double()).float().item() == -127.5:
            return amax, divided
    raise AssertionError("no such amax")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_quant_reference_divides_on_every_device(device) -> None:
    # PyTorch's CUDA division by a Python number multiplies by its reciprocal; the reference
    # must divide there too (as the kernel does), or the negative maximum quantizes to -127.
    amax, scale = _negative_maximum()
    a = torch.tensor([[-amax.item(), 1.0]], dtype=torch.bfloat16, device=device)
    y = gemv_w8a8_dynamic_reference(a, torch.eye(2, dtype=torch.int8, device=device),
                                    torch.ones(2, device=device), torch.bfloat16)
    assert y[0, 0].item() == (-128 * scale).to(torch.bfloat16).item()
