"""The W4A16 GEMM dispatcher (pymllm.quantization.kernels.w4a16) on CPU: the pure kernel choice,
the GEMV's preparation gate, and the routing of w4a16_linear with stand-ins for the GPU kernels.

The kernels themselves are tested on the GPU in mllm-kernel/tests (test_w4a16_gemv.py,
test_w4a16_triton.py, which also runs w4a16_linear end to end).
"""

from __future__ import annotations

import pytest
import torch

from pymllm.quantization.kernels import w4a16
from pymllm.quantization.kernels.w4a16 import (
    GEMV_MAX_M,
    TRITON_MAX_M,
    choose_w4a16_kernel,
    prepare_w4a16_gemv,
    w4a16_linear,
    w4a16_linear_reference,
)


def test_w4a16_kernel_choice():
    # Decode sizes on SM80+: the CUDA GEMV when it is ready and takes the arguments.
    for m in (1, 2, 7, GEMV_MAX_M):
        assert choose_w4a16_kernel(m, sm80=True, gemv_ok=True, triton_ok=True) == "cuda_gemv"
        assert choose_w4a16_kernel(m, sm80=True, gemv_ok=True, triton_ok=False) == "cuda_gemv"
        # Without it (no mllm_kernel/nvcc, failed self-test, unsupported shape): Triton as before.
        assert choose_w4a16_kernel(m, sm80=True, gemv_ok=False, triton_ok=True) == "triton_small_m"
        assert choose_w4a16_kernel(m, sm80=True, gemv_ok=False, triton_ok=False) == "reference"
    # Past the GEMV's rows, even if gemv_ok were claimed: Triton small-M, then dequantize + cuBLAS.
    assert choose_w4a16_kernel(GEMV_MAX_M + 1, sm80=True, gemv_ok=True, triton_ok=True) == "triton_small_m"
    assert choose_w4a16_kernel(TRITON_MAX_M, sm80=True, gemv_ok=False, triton_ok=True) == "triton_small_m"
    assert choose_w4a16_kernel(TRITON_MAX_M + 1, sm80=True, gemv_ok=False, triton_ok=True) == "dequant_cublas"
    assert choose_w4a16_kernel(2048, sm80=True, gemv_ok=False, triton_ok=False) == "reference"
    # CPU / pre-SM80 GPUs and empty inputs: the reference.
    assert choose_w4a16_kernel(1, sm80=False, gemv_ok=True, triton_ok=True) == "reference"
    assert choose_w4a16_kernel(0, sm80=True, gemv_ok=True, triton_ok=True) == "reference"


def test_w4a16_triton_limit_mirrors_the_kernel():
    w4a16_triton = pytest.importorskip("pymllm.quantization.kernels.w4a16_triton")
    assert w4a16_triton.MAX_M == TRITON_MAX_M


def test_w4a16_gemv_prepare_is_off_without_cuda():
    assert prepare_w4a16_gemv(torch.device("cpu"), torch.bfloat16, False) is False
    assert prepare_w4a16_gemv(torch.device("cpu"), torch.float16, True) is False
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    q = torch.zeros(32, 64, dtype=torch.int32)
    s = torch.ones(2, 64, dtype=torch.bfloat16)
    assert w4a16.gemv_fits(x, q, s, None, 128, None) is False  # CPU tensors


def _layer(m: int, k: int = 256, n: int = 64, group: int = 128, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(dtype)
    raw = torch.randint(0, 256, (k // 8, n, 4), generator=gen, dtype=torch.uint8)
    qweight = raw.view(torch.int32).reshape(k // 8, n)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.002).to(dtype)
    zeros = torch.randint(-8, 8, (k // group, n), generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    return x, qweight, scales, zeros, group, bias


@pytest.fixture
def routed(monkeypatch):
    """Pretend to be on an SM90 GPU with the GEMV ready and no Triton; record GEMV calls."""
    gemv_module = pytest.importorskip("mllm_kernel.cuda.jit.w4a16_gemv")
    calls = []

    def fake_gemv(x, qweight, scales, zeros, group, bias=None, out=None, splits=None, validate=True):
        calls.append((tuple(x.shape), validate))
        return gemv_module.w4a16_gemv_reference(x, qweight, scales, zeros, group, bias)

    monkeypatch.setattr(w4a16, "cuda_capability", lambda device: (9, 0))
    monkeypatch.setattr(w4a16, "fast_path_supported", lambda *args: False)
    monkeypatch.setattr(gemv_module, "w4a16_gemv", fake_gemv)
    # gemv_fits checks x.is_cuda and the device; on CPU stand in with the layout checks only.
    monkeypatch.setattr(w4a16, "gemv_fits", lambda x, *rest: 1 <= x.shape[0] <= GEMV_MAX_M)
    return calls


def test_w4a16_linear_routes_decode_rows_to_the_gemv(routed):
    for m in (1, 3, GEMV_MAX_M):
        args = _layer(m)
        out = w4a16_linear(*args)
        expected = w4a16_linear_reference(*args)
        torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert routed == [((1, 256), False), ((3, 256), False), ((GEMV_MAX_M, 256), False)]
    # More rows than the GEMV serves, with Triton unavailable: the reference, not the GEMV.
    args = _layer(GEMV_MAX_M + 1)
    torch.testing.assert_close(w4a16_linear(*args), w4a16_linear_reference(*args))
    assert len(routed) == 3


def test_w4a16_linear_on_cpu_uses_the_reference():
    args = _layer(2)
    assert torch.equal(w4a16_linear(*args), w4a16_linear_reference(*args))
