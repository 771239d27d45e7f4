"""w4a16_gemm's two kernels (mma.sync; the warpgroup kernel on SM 9.0) against the PyTorch
reference (GPU, marked gpu), and on CPU: the kernel choice, the tile and split planners, the
argument checks and the reference's rounding of the weights."""

from __future__ import annotations

import importlib

import pytest
import torch
from test_w4a16_gemv import (
    QWEN3_8B, TOLERANCE, assert_replays_match, random_bytes_int32, random_layer, relative_error,
)

from mllm_kernel import w4a16_gemm, w4a16_gemm_reference
from mllm_kernel.cuda.jit.w4a16_reference import dequantize_reference

module = importlib.import_module("mllm_kernel.cuda.jit.w4a16_gemm")


def exact(x, qweight, scales, zeros, group, bias):
    """The reference before its final rounding: x times the rounded weights, in float64."""
    w = dequantize_reference(qweight, scales, zeros, group, x.dtype).double()
    out = x.double() @ w
    return out + bias.double() if bias is not None else out


def check(m, n, k, group, with_zeros, dtype, with_bias, splits=None, tile_m=None, x=None, kernel=None):
    """One call on fresh random activations (and bias) into a NaN-poisoned output."""
    qweight, scales, zeros = random_layer(n, k, group, with_zeros, dtype)
    x = torch.randn(m, k, device="cuda").to(dtype) if x is None else x
    bias = torch.randn(n, device="cuda").to(dtype) if with_bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    result = w4a16_gemm(x, qweight, scales, zeros, group, bias, out=out, splits=splits, tile_m=tile_m, kernel=kernel)
    assert result.data_ptr() == out.data_ptr()
    error = relative_error(out, exact(x, qweight, scales, zeros, group, bias))
    assert error < TOLERANCE[dtype], (m, n, k, group, with_zeros, dtype, with_bias, splits, tile_m, kernel, error)
    return out


def needs_wgmma(kernel: str = "wgmma"):
    """Skip a test of the warpgroup kernel off SM 9.0 (tests of the mma.sync kernel run anywhere)."""
    if kernel == "wgmma" and (not torch.cuda.is_available() or not module.wgmma_available(torch.device("cuda", 0))):
        pytest.skip("the warpgroup kernel runs on SM 9.0 only")


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 17, 33, 64, 100, 256])
@pytest.mark.parametrize("with_zeros", [False, True])
@pytest.mark.parametrize("group", [32, 128, None])  # None: channel-wise, G = K
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference(dtype, group, with_zeros, m):
    for index, (n, k) in enumerate(QWEN3_8B):
        check(m, n, k, group or k, with_zeros, dtype, with_bias=(index + m) % 2 == 1, kernel="mma")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 65, 128, 200, 256, 520])
@pytest.mark.parametrize("with_zeros", [False, True])
@pytest.mark.parametrize("group", [32, 128, None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgmma_matches_reference(dtype, group, with_zeros, m):
    needs_wgmma()
    for index, (n, k) in enumerate(QWEN3_8B):
        check(m, n, k, group or k, with_zeros, dtype, with_bias=(index + m) % 2 == 1, kernel="wgmma")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel, tile_m", [("mma", 16), ("mma", 32), ("mma", 64),
                                            ("wgmma", 64), ("wgmma", 128), ("wgmma", 256)])
@pytest.mark.parametrize("splits", [1, 2, 3, 8])
def test_every_tile_and_split_on_ragged_shapes(kernel, tile_m, splits):
    needs_wgmma(kernel)
    # N not a multiple of the 128-column tile (nor of 32: lanes past N repeat column N - 4), M not
    # a multiple of the row tile, K = 64 x 24 (splits 1, 2, 3 and 8 divide 24).
    for m, n in ((5, 132), (70, 388), (129, 4), (300, 260)):
        for with_zeros in (False, True):
            check(m, n, 1536, 64, with_zeros, torch.bfloat16, with_bias=m % 2 == 1, splits=splits, tile_m=tile_m,
                  kernel=kernel)


@pytest.mark.gpu
@pytest.mark.parametrize("m, kernel", [(48, "mma"), (128, "wgmma")])
def test_splits_are_deterministic_and_leave_the_counters_clean(m, kernel):
    needs_wgmma(kernel)
    n, k, group = 4096, 12288, 128
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    first = check(m, n, k, group, True, torch.bfloat16, False, splits=4, x=x, kernel=kernel)
    for _ in range(2):  # the counters were reset by each tile's last block: every launch reduces alike
        assert torch.equal(check(m, n, k, group, True, torch.bfloat16, False, splits=4, x=x, kernel=kernel), first)
    assert int(module.workspace(x.device)[1].abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("m", [40, 130])  # 130: the warpgroup kernel on SM 9.0
def test_strided_rows_and_default_output(m):
    base = torch.randn(m, 2 * 4096 + 64, device="cuda").to(torch.float16)
    x = base[:, 64:4096 + 64]  # row stride 8256 elements, 128-byte offset
    qweight, scales, zeros = random_layer(6144, 4096, 64, True, torch.float16)
    out = w4a16_gemm(x, qweight, scales, zeros, 64)
    assert out.shape == (m, 6144) and out.dtype == torch.float16 and out.is_contiguous()
    assert relative_error(out, exact(x, qweight, scales, zeros, 64, None)) < TOLERANCE[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("m, kernel", [(40, "mma"), (128, "wgmma")])
def test_cuda_graph_replay_with_split_k(m, kernel):
    needs_wgmma(kernel)
    n, k, group = 4096, 12288, 128
    qweight, scales, zeros = random_layer(n, k, group, False, torch.bfloat16)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    assert module._auto_plan(m, n, k, 0, kernel)[1] > 1
    assert_replays_match(lambda: w4a16_gemm(x, qweight, scales, zeros, group, bias, out=out, kernel=kernel), x, out,
                         lambda: exact(x, qweight, scales, zeros, group, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel, tile_m", [("mma", None), ("wgmma", 64), ("wgmma", 128), ("wgmma", 256)])
def test_weights_are_those_of_the_dequantizer(kernel, tile_m):
    """The kernel multiplies exactly dequantize_reference's rounded weights: with one-hot rows of x
    each output is one weight (plus nothing), bit for bit (this also pins the warpgroup kernel's
    k order: its activations' transposed pairs must meet the matching weights)."""
    needs_wgmma(kernel)
    for dtype, with_zeros in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)):
        n, k, group = 256, 256, 32
        qweight, scales, zeros = random_layer(n, k, group, with_zeros, dtype)
        x = torch.eye(k, device="cuda", dtype=dtype)
        got = w4a16_gemm(x, qweight, scales, zeros, group, kernel=kernel, tile_m=tile_m)
        assert torch.equal(got, dequantize_reference(qweight, scales, zeros, group, dtype)), dtype


@pytest.mark.gpu
def test_default_kernel_by_rows():
    """Past WGMMA_MIN_M rows an SM 9.0 GPU runs the warpgroup kernel by default (its instance is
    then loaded), elsewhere the mma.sync kernel."""
    device = torch.device("cuda", 0)
    expected = "wgmma" if module.wgmma_available(device) else "mma"
    assert module.kernel_for(module.WGMMA_MIN_M, device) == expected
    assert module.kernel_for(module.WGMMA_MIN_M - 1, device) == "mma"
    check(module.WGMMA_MIN_M, 4096, 4096, 128, False, torch.bfloat16, False)
    instance = module._w4a16_gemm_wgmma.kernel[torch.bfloat16, False]
    assert (device in instance._functions) == (expected == "wgmma")


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


def test_kernel_choice_by_rows_and_device(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(module, "wgmma_available", lambda device: device.type == "cuda")
    assert module.kernel_for(module.WGMMA_MIN_M - 1, cuda) == "mma"
    assert module.kernel_for(module.WGMMA_MIN_M, cuda) == "wgmma"
    assert module.kernel_for(4096, torch.device("cpu")) == "mma"
    monkeypatch.setattr(module, "wgmma_available", lambda device: False)
    assert module.kernel_for(4096, cuda) == "mma"


def test_wgmma_target_is_sm90a_only_where_it_runs(monkeypatch):
    monkeypatch.setattr(module, "wgmma_available", lambda device: True)
    assert module._wgmma_target(torch.device("cuda", 0)).archs == ("9.0a",)
    monkeypatch.setattr(module, "wgmma_available", lambda device: False)
    assert module._wgmma_target(torch.device("cpu")).device == "cpu"


def test_wgmma_plan():
    sms = 132
    assert [module.wgmma_tile_rows(m) for m in (1, 64, 128, 129, 256, 512, 513, 2048)] == [64, 64, 64, 128, 128,
                                                                                          128, 256, 256]
    # Qwen3-8B at 128 rows, the best of T206's sweep: 64-row tiles (two blocks per SM); gate_up's
    # 384 tiles and qkv's 96 need no split (qkv's 2 was level), o and down (64 tiles) split 4 ways.
    assert module.wgmma_plan(128, 24576, 4096, sms) == (64, 1)
    assert module.wgmma_plan(128, 4096, 12288, sms) == (64, 4)
    assert module.wgmma_plan(128, 6144, 4096, sms) == (64, 2)
    assert module.wgmma_plan(128, 4096, 4096, sms) == (64, 4)
    # 256 rows in 128-row tiles (one block per SM): down splits in two, gate_up and qkv not.
    assert module.wgmma_plan(256, 4096, 12288, sms) == (128, 2)
    assert module.wgmma_plan(256, 24576, 4096, sms) == (128, 1)
    assert module.wgmma_plan(256, 6144, 4096, sms) == (128, 1)
    # 64 rows: down splits 8 ways (256 blocks), qkv 4.
    assert module.wgmma_plan(64, 4096, 12288, sms) == (64, 8)
    assert module.wgmma_plan(64, 6144, 4096, sms) == (64, 4)
    for m, n, k in ((1, 4, 64), (300, 6144, 4096), (200, 4096, 4096), (256, 4096, 12288), (20, 4, 1 << 16)):
        tile_m, splits = module.wgmma_plan(m, n, k, sms)
        slots = -(-m // tile_m) * -(-n // module.TILE_N)
        assert (k // 64) % splits == 0
        assert splits == 1 or ((k // 64) // splits >= module.MIN_K_TILES_PER_SPLIT
                               and slots * splits * tile_m * module.TILE_N <= module.WORKSPACE_FLOATS)


def test_build_steps_add_the_warpgroup_kernel_on_sm90(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(module, "wgmma_available", lambda device: True)
    names = [step.name for step in module.build_steps(torch.bfloat16, True, cuda)]
    assert names == ["w4a16_gemm<__nv_bfloat16, true>", "w4a16_gemm_sm90<__nv_bfloat16, true>"]
    monkeypatch.setattr(module, "wgmma_available", lambda device: False)
    assert [step.name for step in module.build_steps(torch.float16, False, cuda)] == ["w4a16_gemm<__half, false>"]


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
    with pytest.raises(ValueError, match="kernel must be one of"):
        w4a16_gemm(*args, kernel="wmma")


def test_wgmma_needs_sm90(monkeypatch):
    monkeypatch.setattr(module, "check_arguments", lambda *args: None)  # CPU tensors stand in for CUDA ones
    monkeypatch.setattr(module, "wgmma_available", lambda device: False)
    args = (torch.zeros(2, 128, dtype=torch.bfloat16), torch.zeros(16, 8, dtype=torch.int32),
            torch.zeros(2, 8, dtype=torch.bfloat16), None, 64)
    with pytest.raises(ValueError, match="SM 9.0"):
        w4a16_gemm(*args, kernel="wgmma")
    monkeypatch.setattr(module, "wgmma_available", lambda device: True)
    with pytest.raises(ValueError, match=r"tile_m must be one of \(64, 128, 256\) for the wgmma kernel"):
        w4a16_gemm(*args, kernel="wgmma", tile_m=32)


def test_reference_rounds_each_weight_once():
    """dequantize_reference is (q - 8 - zero) * scale rounded once to the dtype, and the GEMM
    reference is x times those weights in float64, rounded once."""
    k, n, group = 64, 8, 32
    gen = torch.Generator().manual_seed(0)
    qweight = random_bytes_int32(k // 8, n, gen, "cpu")
    scales = (torch.rand(k // group, n, generator=gen) * 0.1).bfloat16()
    zeros = torch.randint(-8, 8, (k // group, n), generator=gen).bfloat16()
    w = dequantize_reference(qweight, scales, zeros, group, torch.bfloat16)
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
    ours = dequantize_reference(qweight, scales, zeros, group, torch.bfloat16)
    theirs = w4a16.dequantize_wna16_reference(qweight, scales, zeros, group, torch.bfloat16)
    assert torch.equal(ours, theirs)
