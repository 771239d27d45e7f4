"""w4a16_gemv against its float64 PyTorch reference (GPU, marked gpu), and on CPU: the wrapper's
argument checks, the reference's reading of the packed layout, and the split planner."""

from __future__ import annotations

import functools
import importlib
import math

import pytest
import torch

from mllm_kernel import w4a16_gemv, w4a16_gemv_reference
from mllm_kernel.cuda.jit.gemv_kernels import silu_mul_reference

# The package re-exports the function under the module's name, so fetch the module itself.
module = importlib.import_module("mllm_kernel.cuda.jit.w4a16_gemv")
refs = importlib.import_module("mllm_kernel.cuda.jit.w4a16_reference")

# Qwen3-8B layers (N, K): qkv, o, gate_up, down.
QWEN3_8B = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]
# Odd but valid: N not a multiple of the 64-column tile, K not a multiple of the 8-row batch.
SMALL = (36, 96)
# Max |error| / max |reference|: the output is rounded once to the activation dtype, so the error
# is at most half an ulp of the largest output (2^-9 bf16, 2^-12 fp16), with a margin.
TOLERANCE = {torch.bfloat16: 5e-3, torch.float16: 1e-3}


def random_bytes_int32(rows: int, cols: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """Uniformly random 32-bit words (every nibble pattern), without int32 overflow tricks."""
    raw = torch.randint(0, 256, (rows, cols, 4), generator=gen, dtype=torch.uint8)
    return raw.view(torch.int32).reshape(rows, cols).to(device)


@functools.lru_cache(maxsize=8)
def random_layer(n: int, k: int, group: int, with_zeros: bool, dtype: torch.dtype, device: str = "cuda"):
    gen = torch.Generator().manual_seed(n * 31 + k * 7 + group + with_zeros)
    qweight = random_bytes_int32(k // 8, n, gen, device)
    sign = torch.where(torch.rand(k // group, n, generator=gen) < 0.1, -1.0, 1.0)
    scales = ((torch.rand(k // group, n, generator=gen) * 0.02 + 0.002) * sign).to(dtype).to(device)
    zeros = torch.randint(-8, 8, (k // group, n), generator=gen).to(dtype).to(device) if with_zeros else None
    return qweight, scales, zeros


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert not actual.isnan().any(), "output has unwritten (NaN) entries"
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def exact(x, qweight, scales, zeros, group, bias):
    """The reference in float64, before its final rounding."""
    rows = torch.arange(x.shape[1], device=x.device) // group
    w = refs.unpack_int4(qweight).double() - 8.0
    if zeros is not None:
        w = w - zeros.double()[rows]
    w = w * scales.double()[rows]
    out = x.double() @ w
    return out + bias.double() if bias is not None else out


def captured_graph(call) -> torch.cuda.CUDAGraph:
    """``call`` captured in a CUDA graph, after one warm-up run on a side stream (which compiles
    the kernel and allocates its workspace outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph


def assert_replays_match(call, x, out, reference) -> None:
    """``call`` (writing ``out`` from ``x``) captured once, then replayed three times on fresh
    activations into a NaN-poisoned ``out``, each time matching ``reference()`` for the new x."""
    graph = captured_graph(call)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, device="cuda").to(x.dtype))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(out, reference()) < TOLERANCE[x.dtype]


def check(m, n, k, group, with_zeros, dtype, with_bias, splits=None, x=None, bias=None, prefetch=1,
          one_row_warps=None, early_weights=True, one_row_tile_n=None):
    """One call on fresh random activations (and bias) into a NaN-poisoned output."""
    qweight, scales, zeros = random_layer(n, k, group, with_zeros, dtype)
    x = torch.randn(m, k, device="cuda").to(dtype) if x is None else x
    if with_bias and bias is None:
        bias = torch.randn(n, device="cuda").to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    result = w4a16_gemv(x, qweight, scales, zeros, group, bias, out=out, splits=splits, prefetch=prefetch,
                        one_row_warps=one_row_warps, early_weights=early_weights, one_row_tile_n=one_row_tile_n)
    assert result.data_ptr() == out.data_ptr()
    error = relative_error(out, exact(x, qweight, scales, zeros, group, bias))
    assert error < TOLERANCE[dtype], (m, n, k, group, with_zeros, dtype, with_bias, splits, one_row_warps,
                                      one_row_tile_n, error)
    return out


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 33])
@pytest.mark.parametrize("with_zeros", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128, None])  # None: channel-wise, G = K
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference(dtype, group, with_zeros, m):
    for index, (n, k) in enumerate(QWEN3_8B):
        check(m, n, k, group or k, with_zeros, dtype, with_bias=(index + m) % 2 == 1)
    n, k = SMALL  # K = 96: groups 64 and 128 do not divide it, so those cases run channel-wise
    for with_bias in (False, True):
        check(m, n, k, group if group and k % group == 0 else k, with_zeros, dtype, with_bias)


@pytest.mark.gpu
# The register kernel (0) reads no early_weights: once. Narrow 32-column tiles run in 16-warp blocks.
@pytest.mark.parametrize("one_row_warps, early_weights, tile_n", [
    (0, True, 64), (8, False, 64), (8, True, 64), (16, False, 64), (16, True, 64), (16, False, 32), (16, True, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_row_kernels_match_reference(dtype, one_row_warps, early_weights, tile_n):
    # Both kernels of a one-row call (0: the register kernel), every group form, forced and
    # planned splits, K with a partial batch (96 = 12 packed rows: one and a half 8-row batches,
    # three quarters of a narrow tile's 16-row batch), N with a partial tile.
    cases = [(6144, 4096, 128, False), (4096, 12288, 64, True), (24576, 4096, 32, False), (4096, 4096, None, True),
             (36, 96, 32, True), (100, 256, 64, False), (4, 8, None, True)]
    for index, (n, k, group, with_zeros) in enumerate(cases):
        for splits in (None, 1, 3):
            check(1, n, k, group or k, with_zeros, dtype, with_bias=(index + (splits or 0)) % 2 == 1, splits=splits,
                  one_row_warps=one_row_warps, early_weights=early_weights, one_row_tile_n=tile_n)


@pytest.mark.gpu
@pytest.mark.parametrize("one_row_warps, tile_n", [(8, 64), (16, 64), (16, 32)])
def test_one_row_splits_are_deterministic(one_row_warps, tile_n):
    n, k, group = 4096, 12288, 128
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    batches = k // 8 // module.one_row_batch_rows(tile_n)
    for splits in (1, 2, 5, 17, batches, 10 * batches):  # more than the batches: shrunk to one each
        first = check(1, n, k, group, True, torch.bfloat16, True, splits=splits, x=x, bias=bias,
                      one_row_warps=one_row_warps, one_row_tile_n=tile_n)
        # The counters were reset by the last block: a second launch reduces the same way.
        second = check(1, n, k, group, True, torch.bfloat16, True, splits=splits, x=x, bias=bias,
                       one_row_warps=one_row_warps, one_row_tile_n=tile_n)
        assert torch.equal(first, second), splits


@pytest.mark.gpu
def test_one_row_kernel_refuses_more_rows():
    qweight, scales, zeros = random_layer(4096, 4096, 128, False, torch.bfloat16)
    x = torch.randn(2, 4096, device="cuda").to(torch.bfloat16)
    with pytest.raises(ValueError, match="one activation row"):
        w4a16_gemv(x, qweight, scales, zeros, 128, one_row_warps=8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_row_count_and_tiny_shapes(dtype):
    for m in list(range(1, 17)) + [23, 32, 47, module.MAX_M]:
        check(m, 4096, 4096, 128, m % 2 == 0, dtype, with_bias=m % 3 == 0)
    # N below one tile, K with a partial 4-row step (channel-wise is the only group there).
    for n, k, group in [(4, 8, 8), (20, 40, 40), (36, 96, 32), (132, 264, 264), (100, 256, 64)]:
        for m in (1, 5):
            check(m, n, k, group, True, dtype, with_bias=True)


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("m", [9, 13, 16, 17, 40, 64])
def test_wide_rows_equal_narrow_launches(m, gated):
    # The wide kernel runs each chunk of 16 rows as two MMA groups of 8 over one pass of the
    # weights; each group sums exactly as an 8-row (or shorter) launch does, so at the same split
    # the results equal those of 8-row launches bit for bit. (The planned splits depend on the
    # row count, and another split sums in another order: those are checked against the reference.)
    n, k, group = (2 * 1000, 4096, 64) if gated else (1000, 4096, 64)
    qweight, scales, zeros = random_layer(n, k, group, True, torch.float16)
    x = torch.randn(m, k, device="cuda").to(torch.float16)
    bias = torch.randn(n, device="cuda").to(torch.float16)
    planned = w4a16_gemv(x, qweight, scales, zeros, group, bias, gated=gated)
    reference = (refs.w4a16_gemv_gated_reference if gated else w4a16_gemv_reference)(x, qweight, scales, zeros,
                                                                                        group, bias)
    assert relative_error(planned, reference.double()) < 2e-2
    for splits in (1, 3):
        wide = w4a16_gemv(x, qweight, scales, zeros, group, bias, splits=splits, gated=gated)
        # (one_row_warps=0: a last chunk of one row in the register kernel, not the one-row kernel)
        narrow = [w4a16_gemv(x[lo:lo + 8], qweight, scales, zeros, group, bias, splits=splits, gated=gated,
                             one_row_warps=0) for lo in range(0, m, 8)]
        assert torch.equal(wide, torch.cat(narrow)), (m, gated, splits)


@pytest.mark.gpu
def test_forced_splits_agree_and_are_deterministic():
    n, k, group = 4096, 4096, 128
    x = torch.randn(3, k, device="cuda").to(torch.bfloat16)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    batches = k // 8 // module.BATCH_ROWS
    for splits in (1, 2, 5, 17, batches, 10 * batches):  # more than the batches: shrunk to one each
        first = check(3, n, k, group, True, torch.bfloat16, True, splits=splits, x=x, bias=bias)
        # The counters were reset by the last block: a second launch reduces the same way.
        second = check(3, n, k, group, True, torch.bfloat16, True, splits=splits, x=x, bias=bias)
        assert torch.equal(first, second), splits


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [0, 2, 8])
def test_prefetch_distance_does_not_change_results(prefetch):
    # A hint only: no prefetch, and prefetching past the end of a warp's batches.
    for n, k, group in [(4096, 12288, 128), (24576, 4096, 32), (36, 96, 32)]:
        check(2, n, k, group, True, torch.float16, True, prefetch=prefetch)


@pytest.mark.gpu
def test_strided_rows_and_default_output():
    base = torch.randn(4, 2 * 4096 + 64, device="cuda").to(torch.float16)
    x = base[:, 64:4096 + 64]  # row stride 8256 elements, 128-byte offset
    qweight, scales, zeros = random_layer(6144, 4096, 64, True, torch.float16)
    out = w4a16_gemv(x, qweight, scales, zeros, 64)
    assert out.shape == (4, 6144) and out.dtype == torch.float16 and out.is_contiguous()
    assert relative_error(out, exact(x, qweight, scales, zeros, 64, None)) < TOLERANCE[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2])  # the one-row kernel (2 splits planned for this shape) and the register kernel
def test_cuda_graph_replay(m):
    n, k, group = 4096, 12288, 128
    qweight, scales, zeros = random_layer(n, k, group, False, torch.bfloat16)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    assert_replays_match(lambda: w4a16_gemv(x, qweight, scales, zeros, group, bias, out=out), x, out,
                         lambda: exact(x, qweight, scales, zeros, group, bias))


@pytest.mark.gpu
def test_reference_matches_kernel_layout_on_gpu():
    qweight, scales, zeros = random_layer(*SMALL, 32, True, torch.bfloat16)
    x = torch.randn(2, SMALL[1], device="cuda").to(torch.bfloat16)
    reference = w4a16_gemv_reference(x, qweight, scales, zeros, 32)
    kernel = w4a16_gemv(x, qweight, scales, zeros, 32)
    assert relative_error(kernel, reference.double()) < 2 * TOLERANCE[torch.bfloat16]


# ---------------------------------------------------------------- CPU: reference and planner
def test_reference_reads_the_packed_layout():
    """Element by element: w[k, n] = (nibble k % 8 of word (k // 8, n) - 8 - zero) * scale."""
    k, n, group = 64, 8, 32
    gen = torch.Generator().manual_seed(0)
    qweight = random_bytes_int32(k // 8, n, gen, "cpu")
    scales = (torch.rand(k // group, n, generator=gen) + 0.5).half()
    zeros = torch.randint(-8, 8, (k // group, n), generator=gen).half()
    x = torch.randn(3, k, generator=gen).half()
    expected = torch.zeros(3, n, dtype=torch.float64)
    for kk in range(k):
        for nn in range(n):
            word = int(qweight[kk // 8, nn]) & 0xFFFFFFFF
            q = (word >> (4 * (kk % 8))) & 0xF
            w = (q - 8 - float(zeros[kk // group, nn])) * float(scales[kk // group, nn])
            expected[:, nn] += x[:, kk].double() * w
    assert torch.allclose(exact(x, qweight, scales, zeros, group, None), expected)
    got = w4a16_gemv_reference(x, qweight, scales, zeros, group)
    assert got.dtype == torch.float16 and relative_error(got, expected) < TOLERANCE[torch.float16]


def test_reference_agrees_with_pymllm_dequantizer():
    w4a16 = pytest.importorskip("pymllm.quantization.kernels.w4a16")
    k, n, group = 128, 24, 64
    gen = torch.Generator().manual_seed(1)
    qweight = random_bytes_int32(k // 8, n, gen, "cpu")
    scales = torch.rand(k // group, n, generator=gen) + 0.5
    zeros = torch.randint(-8, 8, (k // group, n), generator=gen).float()
    x = torch.randn(2, k, generator=gen)
    ours = w4a16_gemv_reference(x, qweight, scales, zeros, group).double()
    theirs = w4a16.w4a16_linear_reference(x, qweight, scales, zeros, group, None).double()
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-4)


def test_split_plan():
    plan = module.plan_splits
    for m in (1, 8):
        # Qwen3-8B on an H100/H200 (132 SMs): 64 or 96 column tiles need K splits to fill the GPU,
        # gate_up's 384 tiles need few.
        assert plan(m, 4096, 4096, 132) > 1
        assert plan(m, 4096, 12288, 132) > 1
        assert plan(m, 24576, 4096, 132) == 1
        # Split blocks stay within one wave of resident blocks (132 SMs x BLOCKS_PER_SM).
        for n, k in [(6144, 4096), (4096, 4096), (4096, 12288)]:
            assert -(-n // module.TILE_N) * plan(m, n, k, 132) <= 132 * module.BLOCKS_PER_SM
        # Tiny problems and tiny GPUs do not split.
        assert plan(m, 36, 96, 132) == 1
        assert plan(m, 4096, 4096, 1) == 1
    for m in (9, 16, 40, 64):  # the wide kernel: 3 blocks per SM (168 registers), chunks of 16 rows
        assert module.blocks_per_sm_for(m) == module.HEAVY_BLOCKS_PER_SM and module.partial_rows(m) == module.WIDE_ROWS
        chunks = module.row_chunks(m)
        assert chunks == -(-m // module.WIDE_ROWS)
        for n, k in [(6144, 4096), (4096, 4096), (4096, 12288)]:
            splits = plan(m, n, k, 132)
            assert splits == 1 or -(-n // module.TILE_N) * chunks * splits <= 132 * module.HEAVY_BLOCKS_PER_SM
    assert module.blocks_per_sm_for(8) == module.BLOCKS_PER_SM and module.partial_rows(5) == 5
    # A gated launch is planned as the plain one (the same split order, hence bit-equal sums); its
    # narrow kernel (rolling loads) runs 3 blocks per SM, and Qwen3-8B's gate/up still fits one wave.
    n, k = 2 * 12288, 4096
    assert plan(1, n, k, 132) == 1 and -(-n // module.TILE_N) <= 132 * module.HEAVY_BLOCKS_PER_SM
    assert module.row_chunks(8) == 1
    for m, n, k in [(8, 4096, 12288), (8, 256, 65536), (1, 64, 1 << 20), (9, 256, 65536), (64, 256, 65536)]:
        splits = plan(m, n, k, 10_000)  # a huge GPU pushes towards the workspace limit
        slots = -(-n // module.TILE_N) * module.row_chunks(m)
        assert splits == 1 or slots * splits * module.partial_rows(m) * module.TILE_N <= module.WORKSPACE_FLOATS
        assert splits <= -(-k // 8 // module.BATCH_ROWS)


# What hbm_bytes_per_ns reads on an H100 SXM and an H200 (memory clock in kHz, bus bits; runs T137/T138).
H100_BYTES_PER_NS = 2 * 2_619_000e3 * 5120 / 8 / 1e9
H200_BYTES_PER_NS = 2 * 3_201_000e3 * 6016 / 8 / 1e9


def test_one_row_plan():
    plan = module.plan_one_row
    # Qwen3-8B on an H100 / H200 (132 SMs): qkv (96 tiles) 16 warps unsplit, gate/up (384 tiles) 8
    # warps unsplit, o and down (64 tiles) 16 warps in 128 narrow tiles, unsplit: the blocks of 2
    # K splits without the split's round trip.
    for rate in (H100_BYTES_PER_NS, H200_BYTES_PER_NS, math.inf):
        assert plan(6144, 4096, 132, rate) == (16, 1, 64)
        assert plan(4096, 12288, 132, rate) == (16, 1, 32)
        assert plan(4096, 4096, 132, rate) == (16, 1, 32)
        assert plan(24576, 4096, 132, rate) == (8, 1, 64)
    # Without narrow tiles (more than a consumer reads, or than SMs) the split model decides.
    assert plan(8192, 12288, 132, H200_BYTES_PER_NS) == (16, 1, 64)  # 128 tiles already cover the SMs
    assert plan(4096, 12288, 100, H200_BYTES_PER_NS) == (16, 1, 64)  # 128 narrow tiles > 100 SMs
    assert plan(4096, 12288, 127, H200_BYTES_PER_NS) == (16, 1, 64)
    # A Jetson AGX Orin (16 SMs, 204.8 GB/s): every Qwen3-8B layer has more tiles than SMs.
    for n, k in [(6144, 4096), (4096, 4096), (4096, 12288), (24576, 4096)]:
        assert plan(n, k, 16, 204.8) == (8, 1, 64)
    # Few tiles of a long K split until the grid covers the SMs, never past one batch per split;
    # a layer this small that one block streams it in less than a split costs stays whole.
    assert plan(64, 4096, 132, H200_BYTES_PER_NS) == (16, 64, 64)  # equal to 2 x 32 narrow splits: wide
    assert plan(36, 96, 132, H200_BYTES_PER_NS) == (16, 1, 32)  # two narrow blocks pull twice one
    assert plan(4, 8, 132) == (16, 1, 64)
    for n, k in [(64, 1 << 20), (4096, 4096), (256, 65536), (5120, 25600)]:
        warps, splits, tile_n = plan(n, k, 10_000)  # a huge GPU pushes towards the workspace limit
        assert -(-n // tile_n) * splits * tile_n <= module.WORKSPACE_FLOATS
        assert splits <= -(-k // 8 // module.one_row_batch_rows(tile_n))
        assert tile_n == module.TILE_N or -(-n // tile_n) <= module.MAX_NORM_TILES


def test_hbm_rate_from_device_properties(monkeypatch):
    class Props:
        memory_clock_rate = 2_619_000  # kHz, as CUDA reports an H100 SXM's HBM3
        memory_bus_width = 5120

    module.hbm_bytes_per_ns.cache_clear()
    monkeypatch.setattr(module.torch.cuda, "get_device_properties", lambda index: Props())
    assert module.hbm_bytes_per_ns(0) == pytest.approx(3352.3, abs=0.1)
    module.hbm_bytes_per_ns.cache_clear()
    monkeypatch.setattr(module.torch.cuda, "get_device_properties", lambda index: object())
    assert module.hbm_bytes_per_ns(0) == math.inf  # an older torch without the two fields
    module.hbm_bytes_per_ns.cache_clear()


# ---------------------------------------------------------------- GPU: the gated form
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8, 12])
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("with_zeros, with_bias", [(False, False), (True, True)])
def test_gated_is_the_plain_launch_then_silu_mul(m, splits, with_zeros, with_bias):
    # The gated epilogue sums each column exactly as the plain launch does (same tiles, same split
    # order), so g and u are the plain outputs bit for bit; only the SiLU-and-mul (approximate
    # exp / division against PyTorch's) may move a result by a unit in the last place.
    dtype = torch.bfloat16
    for n, k, group in ((2 * 12288, 4096, 128), (2 * 100, 512, 64)):
        qweight, scales, zeros = random_layer(n, k, group, with_zeros, dtype)
        x = torch.randn(m, k, device="cuda").to(dtype)
        bias = torch.randn(n, device="cuda").to(dtype) if with_bias else None
        out = torch.full((m, n // 2), float("nan"), dtype=dtype, device="cuda")
        got = w4a16_gemv(x, qweight, scales, zeros, group, bias, out=out, splits=splits, gated=True)
        assert got.data_ptr() == out.data_ptr() and torch.isfinite(got).all()
        plain = w4a16_gemv(x, qweight, scales, zeros, group, bias, splits=splits)
        pairs = [(got, plain)]
        if m == 1:  # the same with narrow tiles (16 gate and 16 up columns per block)
            narrow = dict(splits=splits, one_row_warps=16, one_row_tile_n=32)
            pairs.append((w4a16_gemv(x, qweight, scales, zeros, group, bias, gated=True, **narrow),
                          w4a16_gemv(x, qweight, scales, zeros, group, bias, **narrow)))
        ulp = 2.0**-7
        for gated_out, plain_out in pairs:
            want = silu_mul_reference(plain_out).float()
            assert ((gated_out.float() - want).abs() <= 2 * ulp * want.abs() + 2.0**-126).all(), (n, k, m, splits)
            assert (gated_out.float() == want).float().mean().item() > 0.9
        reference = refs.w4a16_gemv_gated_reference(x, qweight, scales, zeros, group, bias).float()
        assert ((got.float() - reference).abs() <= 0.02 * reference.abs().max()).all()


@pytest.mark.gpu
def test_gated_in_a_cuda_graph_with_split_k():
    qweight, scales, zeros = random_layer(2 * 256, 1024, 128, False, torch.bfloat16)
    x = torch.randn(1, 1024, device="cuda").to(torch.bfloat16)
    expected = w4a16_gemv(x, qweight, scales, zeros, 128, splits=4, gated=True)  # builds outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_gemv(x, qweight, scales, zeros, 128, splits=4, gated=True)
    for _ in range(2):  # the counters are reset by each launch
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)


# ---------------------------------------------------------------- CPU: argument checks
def _valid(m=2, n=64, k=256, group=64, dtype=torch.bfloat16, device="cpu"):
    return dict(
        x=torch.zeros(m, k, dtype=dtype, device=device),
        qweight=torch.zeros(k // 8, n, dtype=torch.int32, device=device),
        scales=torch.ones(k // group, n, dtype=dtype, device=device),
        zeros=torch.zeros(k // group, n, dtype=dtype, device=device),
        group=group,
        bias=torch.zeros(n, dtype=dtype, device=device),
    )


def _with(**changes):
    args = _valid()
    args.update(changes)
    return args


INVALID = [
    (_with(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (_with(x=torch.zeros(2, 256)), TypeError, "x must be float16 or bfloat16"),
    (_with(x=torch.zeros(1, 2, 256, dtype=torch.bfloat16)), ValueError, r"x must be 2-D \[M, K\]"),
    (_with(x=torch.zeros(65, 256, dtype=torch.bfloat16)), ValueError, r"x must have 1..64 rows"),
    (_with(x=torch.zeros(0, 256, dtype=torch.bfloat16)), ValueError, r"x must have 1..64 rows"),
    (_with(x=torch.zeros(2, 252, dtype=torch.bfloat16)), ValueError,
     r"K \(x.shape\[1\] = 252\) must be a positive multiple of 8"),
    (_with(x=torch.zeros(2, 512, dtype=torch.bfloat16)[:, ::2]), ValueError, "x needs unit column stride"),
    (_with(x=torch.zeros(2, 260, dtype=torch.bfloat16)[:, :256]), ValueError, "x needs unit column stride"),
    (_with(x=torch.zeros(2, 264, dtype=torch.bfloat16)[:, 1:257]), ValueError, "16-byte aligned start"),
    (_with(qweight=torch.zeros(32, 64, dtype=torch.int64)), TypeError, "qweight must be int32"),
    (_with(qweight=torch.zeros(31, 64, dtype=torch.int32)), ValueError, r"qweight must be \[K/8, N\] = \[32, N\]"),
    (_with(qweight=torch.zeros(32, 66, dtype=torch.int32)), ValueError,
     r"N \(qweight.shape\[1\] = 66\) must be a multiple of 4"),
    (_with(qweight=torch.zeros(64, 32, dtype=torch.int32).t()), ValueError, "qweight must be contiguous"),
    (_with(group=48), ValueError, r"group \(48\) must be K \(256\) or a power of two >= 32 dividing K"),
    (_with(group=16, scales=torch.ones(16, 64, dtype=torch.bfloat16)), ValueError, r"group \(16\) must be K"),
    (_with(group=512), ValueError, r"group \(512\) must be K"),
    (_with(group=64.0), TypeError, "group must be an int"),
    (_with(scales=torch.ones(4, 64, dtype=torch.float16)), TypeError, "scales must have x's dtype"),
    (_with(scales=torch.ones(2, 64, dtype=torch.bfloat16)), ValueError, r"scales must be \[K/G, N\] = \[4, 64\]"),
    (_with(scales=torch.ones(64, 4, dtype=torch.bfloat16).t()), ValueError, "scales must be contiguous"),
    (_with(zeros=torch.zeros(4, 60, dtype=torch.bfloat16)), ValueError, r"zeros must be \[K/G, N\]"),
    (_with(zeros=torch.zeros(4, 64, dtype=torch.int32)), TypeError, "zeros must have x's dtype"),
    (_with(bias=torch.zeros(64)), TypeError, "bias must have x's dtype"),
    (_with(bias=torch.zeros(63, dtype=torch.bfloat16)), ValueError, r"bias must be a contiguous \[N\] = \[64\]"),
    (_with(bias=torch.zeros(128, dtype=torch.bfloat16)[::2]), ValueError, r"bias must be a contiguous \[N\]"),
    (_with(qweight=torch.zeros(32, 64, dtype=torch.int32, device="meta")), ValueError,
     "qweight is on meta but x is on cpu"),
    (_valid(), ValueError, "CUDA only, got tensors on cpu; use w4a16_gemv_reference"),
]


@pytest.mark.parametrize("args, error, message", INVALID)
def test_argument_errors(args, error, message):
    with pytest.raises(error, match=message):
        w4a16_gemv(**args)
    assert not module.supported(**args)


def test_output_and_splits_errors():
    args = _valid()
    with pytest.raises(ValueError, match=r"out must be a contiguous \[M, N\] = \[2, 64\]"):
        w4a16_gemv(**args, out=torch.empty(2, 63, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="out must be a tensor of x's dtype"):
        w4a16_gemv(**args, out=torch.empty(2, 64))
    for splits in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="splits must be a positive int"):
            w4a16_gemv(**args, splits=splits)
    for prefetch in (-1, 9, 1.0, None):
        with pytest.raises(ValueError, match=r"prefetch must be an int in 0..8"):
            w4a16_gemv(**args, prefetch=prefetch)
    for warps in (4, 32, True, 8.0):
        with pytest.raises(ValueError, match=r"one_row_warps must be None, 0 or one of \(8, 16\)"):
            w4a16_gemv(**args, one_row_warps=warps)
    for tile_n in (16, 128, True, 32.5):
        with pytest.raises(ValueError, match=r"one_row_tile_n must be None or one of \(64, 32\)"):
            w4a16_gemv(**args, one_row_tile_n=tile_n)
    for warps in (0, 8, None):  # None: M = 2 runs the register kernel
        with pytest.raises(ValueError, match="narrow tiles .* run in 16-warp one-row blocks"):
            w4a16_gemv(**args, one_row_warps=warps, one_row_tile_n=32)


def test_gated_argument_errors():
    args = _valid()
    with pytest.raises(ValueError, match=r"out must be a contiguous \[M, N/2\] = \[2, 32\]"):
        w4a16_gemv(**args, out=torch.empty(2, 64, dtype=torch.bfloat16), gated=True)
    odd = _with(qweight=torch.zeros(32, 60, dtype=torch.int32), scales=torch.ones(4, 60, dtype=torch.bfloat16),
                zeros=None, bias=None)
    with pytest.raises(ValueError, match=r"gated: N \(qweight.shape\[1\] = 60\) must be a multiple of 8"):
        w4a16_gemv(**odd, gated=True)
    assert not module.supported(**odd, gated=True)
    assert module.argument_problem(**odd, out=None)[1].startswith("CUDA only")  # the plain form takes N = 60


def test_gated_reference_is_the_reference_then_silu_mul():
    gen = torch.Generator().manual_seed(2)
    k, n, group = 64, 16, 32
    qweight = random_bytes_int32(k // 8, n, gen, "cpu")
    scales = (torch.rand(k // group, n, generator=gen) * 0.05).to(torch.bfloat16)
    x = torch.randn(2, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    gate_up = refs.w4a16_gemv_reference(x, qweight, scales, None, group, bias)
    g, u = gate_up.float().chunk(2, dim=-1)
    expected = ((g * torch.sigmoid(g)).to(torch.bfloat16).float() * u).to(torch.bfloat16)
    got = refs.w4a16_gemv_gated_reference(x, qweight, scales, None, group, bias)
    assert got.shape == (2, n // 2)
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=0)


def test_supported_accepts_valid_cuda_shaped_arguments():
    # Everything but the device is valid: supported() says no on CPU only because of the device.
    args = _valid()
    assert module.argument_problem(**args, out=None)[1].startswith("CUDA only")
    channel = _with(group=256, scales=torch.ones(1, 64, dtype=torch.bfloat16), zeros=None, bias=None)
    assert module.argument_problem(**channel, out=None)[1].startswith("CUDA only")
    odd_k = _with(x=torch.zeros(2, 40, dtype=torch.bfloat16), qweight=torch.zeros(5, 64, dtype=torch.int32),
                  group=40, scales=torch.ones(1, 64, dtype=torch.bfloat16), zeros=None)
    assert module.argument_problem(**odd_k, out=None)[1].startswith("CUDA only")
