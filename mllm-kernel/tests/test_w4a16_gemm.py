"""w4a16_gemm against its PyTorch reference (GPU, marked gpu), and on CPU: the tile and split
planner, the argument checks and the reference's rounding of the weights."""

from __future__ import annotations

import importlib

import pytest
import torch
from test_w4a16_gemv import QWEN3_8B, TOLERANCE, captured_graph, random_bytes_int32, random_layer, relative_error

from mllm_kernel import w4a16_gemm, w4a16_gemm_reference

module = importlib.import_module("mllm_kernel.cuda.jit.w4a16_gemm")


def exact(x, qweight, scales, zeros, group, bias):
    """The reference before its final rounding: x times the rounded weights, in float64."""
    w = module.dequantize_reference(qweight, scales, zeros, group, x.dtype).double()
    out = x.double() @ w
    return out + bias.double() if bias is not None else out


def check(m, n, k, group, with_zeros, dtype, with_bias, splits=None, tile_m=None, x=None):
    """One call on fresh random activations (and bias) into a NaN-poisoned output."""
    qweight, scales, zeros = random_layer(n, k, group, with_zeros, dtype)
    x = torch.randn(m, k, device="cuda").to(dtype) if x is None else x
    bias = torch.randn(n, device="cuda").to(dtype) if with_bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    result = w4a16_gemm(x, qweight, scales, zeros, group, bias, out=out, splits=splits, tile_m=tile_m)
    assert result.data_ptr() == out.data_ptr()
    error = relative_error(out, exact(x, qweight, scales, zeros, group, bias))
    assert error < TOLERANCE[dtype], (m, n, k, group, with_zeros, dtype, with_bias, splits, tile_m, error)
    return out


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 17, 33, 64, 100, 256])
@pytest.mark.parametrize("with_zeros", [False, True])
@pytest.mark.parametrize("group", [32, 128, None])  # None: channel-wise, G = K
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference(dtype, group, with_zeros, m):
    for index, (n, k) in enumerate(QWEN3_8B):
        check(m, n, k, group or k, with_zeros, dtype, with_bias=(index + m) % 2 == 1)


@pytest.mark.gpu
@pytest.mark.parametrize("tile_m", [16, 32, 64])
@pytest.mark.parametrize("splits", [1, 2, 3, 8])
def test_every_tile_and_split_on_ragged_shapes(tile_m, splits):
    # N not a multiple of the 128-column tile (nor of 32: lanes past N repeat column N - 4), M not
    # a multiple of the row tile, K = 64 x 24 (splits 1, 2, 3 and 8 divide 24).
    for m, n in ((5, 132), (70, 388), (129, 4)):
        for with_zeros in (False, True):
            check(m, n, 1536, 64, with_zeros, torch.bfloat16, with_bias=m % 2 == 1, splits=splits, tile_m=tile_m)


@pytest.mark.gpu
def test_splits_are_deterministic_and_leave_the_counters_clean():
    n, k, group = 4096, 12288, 128
    x = torch.randn(48, k, device="cuda").to(torch.bfloat16)
    first = check(48, n, k, group, True, torch.bfloat16, False, splits=4, x=x)
    for _ in range(2):  # the counters were reset by each tile's last block: every launch reduces alike
        assert torch.equal(check(48, n, k, group, True, torch.bfloat16, False, splits=4, x=x), first)
    assert int(module.workspace(x.device)[1].abs().sum()) == 0


@pytest.mark.gpu
def test_strided_rows_and_default_output():
    base = torch.randn(40, 2 * 4096 + 64, device="cuda").to(torch.float16)
    x = base[:, 64:4096 + 64]  # row stride 8256 elements, 128-byte offset
    qweight, scales, zeros = random_layer(6144, 4096, 64, True, torch.float16)
    out = w4a16_gemm(x, qweight, scales, zeros, 64)
    assert out.shape == (40, 6144) and out.dtype == torch.float16 and out.is_contiguous()
    assert relative_error(out, exact(x, qweight, scales, zeros, 64, None)) < TOLERANCE[torch.float16]


@pytest.mark.gpu
def test_cuda_graph_replay_with_split_k():
    n, k, group, m = 4096, 12288, 128, 40
    qweight, scales, zeros = random_layer(n, k, group, False, torch.bfloat16)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    assert module.plan(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count)[1] > 1
    graph = captured_graph(lambda: w4a16_gemm(x, qweight, scales, zeros, group, bias, out=out))
    for _ in range(3):
        x.copy_(torch.randn(m, k, device="cuda").to(torch.bfloat16))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(out, exact(x, qweight, scales, zeros, group, bias)) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_weights_are_those_of_the_dequantizer():
    """The kernel multiplies exactly dequantize_reference's rounded weights: with one-hot rows of x
    each output is one weight (plus nothing), bit for bit."""
    for dtype, with_zeros in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)):
        n, k, group = 256, 128, 32
        qweight, scales, zeros = random_layer(n, k, group, with_zeros, dtype)
        x = torch.eye(k, device="cuda", dtype=dtype)
        got = w4a16_gemm(x, qweight, scales, zeros, group)
        assert torch.equal(got, module.dequantize_reference(qweight, scales, zeros, group, dtype)), dtype


# ---------------------------------------------------------------- CPU: planner, checks, reference
def test_tile_rows_follow_the_sweep():
    sms = 132
    # Qwen3-8B (T195): 16 rows; qkv / o / down up to 32 rows in 16-row tiles, gate_up (192 column
    # tiles) in 32; 32-row tiles from 33 rows, gate_up 64 from 96 rows, everything 64 at 2,048.
    assert module.tile_rows(16, 24576, sms) == 16
    assert [module.tile_rows(32, n, sms) for n in (6144, 4096, 24576)] == [16, 16, 32]
    assert [module.tile_rows(64, n, sms) for n in (6144, 4096, 24576)] == [32, 32, 32]
    assert module.tile_rows(96, 24576, sms) == 64 and module.tile_rows(256, 4096, sms) == 32
    assert {module.tile_rows(2048, n, sms) for n in (6144, 4096, 24576)} == {64}


def test_plan_splits_k_while_blocks_are_few():
    sms = 132
    # down_proj at 64 rows: 64 slots of 32 rows -> 4 splits (256 blocks); gate_up has 384: none.
    assert module.plan(64, 4096, 12288, sms) == (32, 4)
    assert module.plan(64, 24576, 4096, sms) == (32, 1)
    assert module.plan(32, 6144, 4096, sms) == (16, 4)
    # o_proj at 256 rows already has 256 blocks (T195: split in two was 17 % slower).
    assert module.plan(256, 4096, 4096, sms) == (32, 1)
    # Each split keeps at least MIN_K_TILES_PER_SPLIT tiles of 64 k; K / 64 odd: no split.
    assert module.plan(16, 128, 1024, sms) == (16, 2)
    assert module.plan(16, 128, 64 * 45, sms) == (16, 1)
    for m, n, k in ((1, 4, 64), (300, 6144, 4096), (17, 4096, 4096), (256, 4096, 12288), (20, 4, 1 << 16)):
        tile_m, splits = module.plan(m, n, k, sms)
        slots = -(-m // tile_m) * -(-n // module.TILE_N)
        assert (k // 64) % splits == 0 and slots * splits * tile_m * module.TILE_N <= module.WORKSPACE_FLOATS


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"x": torch.zeros(2, 96, dtype=torch.bfloat16), "group": 32}, ValueError, "multiple of 64"),
        ({"x": torch.zeros(0, 128, dtype=torch.bfloat16)}, ValueError, "at least 1 rows"),
        ({"x": torch.zeros(2, 128, dtype=torch.float32)}, TypeError, "float16 or bfloat16"),
        ({"group": 48}, ValueError, "power of two"),
        ({}, ValueError, "CUDA only"),
    ],
)
def test_argument_errors(kwargs, error, message):
    k = kwargs.get("x", torch.zeros(2, 128)).shape[1]
    group = kwargs.get("group", 64)
    args = {
        "x": torch.zeros(2, 128, dtype=torch.bfloat16),
        "qweight": torch.zeros(max(k, 8) // 8, 8, dtype=torch.int32),
        "scales": torch.zeros(max(k // group, 1), 8, dtype=torch.bfloat16),
        "zeros": None,
        "group": group,
    }
    args.update(kwargs)
    with pytest.raises(error, match=message):
        w4a16_gemm(**args)
    assert not module.supported(**args)


def test_override_errors():
    args = (torch.zeros(2, 128, dtype=torch.bfloat16), torch.zeros(16, 8, dtype=torch.int32),
            torch.zeros(2, 8, dtype=torch.bfloat16), None, 64)
    with pytest.raises(ValueError, match="tile_m"):
        w4a16_gemm(*args, tile_m=48)
    with pytest.raises(ValueError, match="splits"):
        w4a16_gemm(*args, splits=0)


def test_reference_rounds_each_weight_once():
    """dequantize_reference is (q - 8 - zero) * scale rounded once to the dtype, and the GEMM
    reference is x times those weights in float64, rounded once."""
    k, n, group = 64, 8, 32
    gen = torch.Generator().manual_seed(0)
    qweight = random_bytes_int32(k // 8, n, gen, "cpu")
    scales = (torch.rand(k // group, n, generator=gen) * 0.1).bfloat16()
    zeros = torch.randint(-8, 8, (k // group, n), generator=gen).bfloat16()
    w = module.dequantize_reference(qweight, scales, zeros, group, torch.bfloat16)
    for kk in range(0, k, 7):
        for nn in range(n):
            q = ((int(qweight[kk // 8, nn]) & 0xFFFFFFFF) >> (4 * (kk % 8))) & 0xF
            value = (q - 8 - float(zeros[kk // group, nn])) * float(scales[kk // group, nn])
            assert w[kk, nn].item() == torch.tensor(value, dtype=torch.float64).bfloat16().item()
    x = torch.randn(3, k, generator=gen).bfloat16()
    expected = (x.double() @ w.double()).bfloat16()
    assert torch.equal(w4a16_gemm_reference(x, qweight, scales, zeros, group), expected)


def test_reference_agrees_with_pymllm_dequantizer():
    w4a16 = pytest.importorskip("pymllm.quantization.kernels.w4a16")
    k, n, group = 128, 24, 64
    gen = torch.Generator().manual_seed(1)
    qweight = random_bytes_int32(k // 8, n, gen, "cpu")
    scales = (torch.rand(k // group, n, generator=gen) + 0.5).bfloat16()
    zeros = torch.randint(-8, 8, (k // group, n), generator=gen).bfloat16()
    ours = module.dequantize_reference(qweight, scales, zeros, group, torch.bfloat16)
    theirs = w4a16.dequantize_wna16_reference(qweight, scales, zeros, group, torch.bfloat16)
    assert torch.equal(ours, theirs)
