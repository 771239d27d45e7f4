"""W4A16 Triton kernels (pymllm.quantization.kernels.w4a16_triton) against a PyTorch reference.

On CPU the kernels run in Triton's interpreter, in a subprocess (TRITON_INTERPRET must be set
before Triton decorates the kernels); fp16 there, since the interpreter's bf16 dot is wrong.
On a GPU they run for real, fp16 and bf16, many M, into NaN-poisoned outputs.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from pymllm.testing.triton_interpreter import check_in_interpreter

pytest.importorskip("triton")


def random_layer(k: int, n: int, group: int, symmetric: bool, dtype: torch.dtype, device: str, seed: int):
    """Runtime-layout tensors plus the dense reference W^T [K, N] (float64)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)  # unsigned nibbles
    words = torch.zeros(k // 8, n, dtype=torch.int32)
    for i in range(8):
        words |= q[i::8] << (4 * i)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.002).to(dtype)
    zeros = None if symmetric else torch.randint(-8, 8, (k // group, n), generator=gen).to(dtype)
    rows = torch.arange(k) // group
    w = q.double() - 8.0
    if zeros is not None:
        w = w - zeros.double()[rows]
    w = w * scales.double()[rows]
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(words), to(scales), to(zeros), w.to(device)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert not actual.isnan().any(), "output has unwritten (NaN) entries"
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()


def check_gemm(m: int, n: int, k: int, group: int, symmetric: bool, dtype: torch.dtype, device: str,
               with_bias: bool, config=None, tol: Optional[float] = None, large_m: bool = False) -> None:
    """The small-M kernel (or, with ``large_m``, the large-M one) into a NaN-poisoned output."""
    from pymllm.quantization.kernels import w4a16_triton

    words, scales, zeros, w = random_layer(k, n, group, symmetric, dtype, device, seed=m * 7 + n + k)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype) if with_bias else None
    expected = x.double() @ w + (bias.double() if bias is not None else 0)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    gemm = w4a16_triton.w4a16_gemm_large_m if large_m else w4a16_triton.w4a16_gemm_small_m
    gemm(x, words, scales, zeros, group, bias, config=config, out=out)
    error = relative_error(out, expected)
    assert error < (tol or (2e-2 if dtype == torch.bfloat16 else 4e-3)), (m, n, k, group, symmetric, dtype, error)


def check_dequantize(k: int, n: int, group: int, symmetric: bool, dtype: torch.dtype, device: str) -> None:
    from pymllm.quantization.kernels import w4a16_triton

    words, scales, zeros, w = random_layer(k, n, group, symmetric, dtype, device, seed=k + n)
    dense = w4a16_triton.w4a16_dequantize(words, scales, zeros, group, dtype)
    assert torch.equal(dense, w.to(dtype))


def interpreter_checks() -> None:
    from pymllm.quantization.kernels.triton_common import SmallMConfig

    half = torch.float16
    for m, n, k, group, symmetric in [
        (1, 96, 256, 32, True), (1, 64, 512, 128, False), (1, 40, 256, 256, True),
        (3, 64, 256, 64, False), (16, 80, 256, 128, True), (17, 48, 128, 32, False),
    ]:
        check_gemm(m, n, k, group, symmetric, half, "cpu", with_bias=m % 2 == 1)
        # Split-K with a reduction, and (M == 1) the multiply-reduce loop with split K.
        check_gemm(m, n, k, group, symmetric, half, "cpu", True, SmallMConfig(16 if m <= 16 else 32, 32, 64, 2, True, 4, 2))
        if m == 1:
            check_gemm(m, n, k, group, symmetric, half, "cpu", False, SmallMConfig(1, 16, 64, 4, False, 4, 2))
    # The large-M kernel: partial row and column tiles, groups inside and across a K tile, zero
    # points, bias, split K, several row tiles per band of GROUP_M.
    from pymllm.quantization.kernels import w4a16_triton
    from pymllm.quantization.kernels.w4a16_triton import LargeMConfig

    for m, n, k, group, symmetric, cfg in [
        (5, 48, 128, 32, False, LargeMConfig(16, 32, 64, 1, 2, 4, 2)),
        (70, 96, 256, 128, True, LargeMConfig(32, 64, 64, 2, 2, 4, 2)),
        (40, 64, 256, 64, False, LargeMConfig(16, 32, 128, 1, 4, 4, 2)),
        (33, 40, 192, 192, True, LargeMConfig(16, 32, 64, 3, 8, 4, 2)),
    ]:
        check_gemm(m, n, k, group, symmetric, half, "cpu", with_bias=m % 2 == 1, config=cfg, large_m=True)
    check_gemm(20, 64, 256, 128, False, half, "cpu", with_bias=True, large_m=True)  # its default tiles
    words, scales, _, _ = random_layer(128, 32, 128, True, half, "cpu", seed=0)
    empty = w4a16_triton.w4a16_gemm_large_m(torch.empty(0, 128, dtype=half), words, scales, None, 128)
    assert empty.shape == (0, 32)
    # bf16 activations through the multiply-reduce loop (no dot, which the interpreter gets wrong).
    check_gemm(1, 64, 256, 128, True, torch.bfloat16, "cpu", True)
    check_dequantize(128, 96, 32, False, half, "cpu")
    check_dequantize(256, 64, 256, True, half, "cpu")


def test_kernels_in_triton_interpreter():
    result = check_in_interpreter([__file__], timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_repack_matches_compressed_tensors_packing():
    """The checkpoint packs with compressed-tensors' pack_to_int32; the repack must invert it."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from pymllm.quantization.kernels.w4a16 import dequantize_wna16_reference, repack_wna16

    n, k, group = 48, 256, 64
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    zero = torch.randint(-8, 8, (n, k // group), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=gen) + 0.1
    packed = helpers.pack_to_int32(q, 4)
    packed_zero = helpers.pack_to_int32(zero, 4, packed_dim=0)
    qweight, scales, zeros = repack_wna16(packed, scale, packed_zero, torch.float32)
    assert qweight.shape == (k // 8, n) and scales.shape == (k // group, n) and zeros.shape == (k // group, n)
    assert torch.equal(zeros, zero.t().float())
    rows = torch.arange(k) // group
    expected = (q.float() - zero.float()[:, rows]) * scale[:, rows]
    assert torch.equal(dequantize_wna16_reference(qweight, scales, zeros, group, torch.float32), expected.t())


GPU_SHAPES = [(4096, 4096), (6144, 4096), (4096, 12288), (24576, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,symmetric", [(128, True), (32, True), (64, False), (None, True)])
@pytest.mark.parametrize("m", [1, 7, 16, 64])
def test_small_m_gemm_on_gpu(m, group, symmetric, dtype):
    for n, k in GPU_SHAPES[:2] if m > 1 else GPU_SHAPES:
        check_gemm(m, n, k, group or k, symmetric, dtype, "cuda", with_bias=m % 2 == 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,symmetric", [(128, True), (32, True), (64, False), (None, True)])
@pytest.mark.parametrize("m", [65, 200, 2048])
def test_large_m_gemm_on_gpu(m, group, symmetric, dtype):
    for n, k in GPU_SHAPES[:3]:
        check_gemm(m, n, k, group or k, symmetric, dtype, "cuda", with_bias=m % 2 == 1, large_m=True)


@pytest.mark.gpu
def test_large_m_gemm_tilings_on_gpu():
    """Every tiling the dispatcher can pick (and split K) on a ragged shape."""
    from pymllm.quantization.kernels import w4a16_triton
    from pymllm.quantization.kernels.w4a16_triton import LargeMConfig

    for cfg in (LargeMConfig(64, 128, 64, 1, 8, 4, 4), LargeMConfig(128, 128, 64, 2, 8, 8, 3),
                LargeMConfig(128, 256, 64, 1, 8, 8, 3), LargeMConfig(64, 64, 128, 4, 8, 4, 4)):
        check_gemm(333, 1000, 2048, 128, False, torch.bfloat16, "cuda", with_bias=True, config=cfg, large_m=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dispatcher_on_gpu(dtype):
    """w4a16_linear for decode and prefill sizes (CUDA GEMV up to 64 rows, fused Triton kernel,
    dequantize + cuBLAS) vs reference."""
    from pymllm.quantization.kernels.w4a16 import w4a16_linear

    n, k, group = 4096, 4096, 128
    words, scales, zeros, w = random_layer(k, n, group, False, dtype, "cuda", seed=1)
    bias = torch.randn(n, device="cuda").to(dtype)
    for m in (1, 7, 8, 9, 16, 64, 65, 2048):
        x = torch.randn(m, k, device="cuda").to(dtype)
        expected = x.double() @ w + bias.double()
        assert relative_error(w4a16_linear(x, words, scales, zeros, group, bias), expected) < 2e-2, m


@pytest.mark.gpu
def test_dequantize_on_gpu():
    for group, symmetric in [(32, False), (128, True), (4096, True)]:
        check_dequantize(4096, 6144, group, symmetric, torch.bfloat16, "cuda")


if __name__ == "__main__":
    interpreter_checks()
