"""The RMSNorm that quantizes its own output per token (int8_activation_triton.rms_norm_quant_int8),
which a W8A8 layer behind a pre-norm uses instead of an RMSNorm launch and a quantization launch:
the same bits as those two Triton kernels (interpreter on the CPU, CUDA on the GPU), and the
scheme's wiring."""

from __future__ import annotations

import pytest
import torch

from pymllm.tests.helpers import assert_passes_under_triton_interpreter


def check_against_separate_kernels(rows: int, n: int, dtype: torch.dtype, device: str, with_residual: bool) -> None:
    from pymllm.layers.kernels.norm_act_triton import rms_norm
    from pymllm.quantization.kernels.int8_activation_triton import (
        per_token_quant_int8_triton, rms_norm_quant_int8_triton,
    )

    gen = torch.Generator().manual_seed(rows * 7 + n)
    x = (torch.randn(rows, n, generator=gen) * 3).to(dtype=dtype, device=device)
    res = (torch.randn(rows, n, generator=gen)).to(dtype=dtype, device=device) if with_residual else None
    w = (1 + 0.3 * torch.randn(n, generator=gen)).to(dtype=dtype, device=device)
    x_before = x.clone()
    q, scale, res_out = rms_norm_quant_int8_triton(x, w, 1e-6, res)
    normed, want_res = rms_norm(x, w, 1e-6, residual=res)
    want_q, want_scale = per_token_quant_int8_triton(normed)
    assert q.dtype == torch.int8 and scale.shape == (rows, 1)
    assert torch.equal(q, want_q) and torch.equal(scale, want_scale)
    if with_residual:
        assert torch.equal(res_out, want_res)
    else:
        assert res_out is x  # as norm_with_residual: the block's input is its residual
    assert torch.equal(x, x_before)
    # And against a float reference: half a quantization step of rounding, plus the few units in the
    # last place by which the kernel's RMSNorm (its own sum order, an approximate rsqrt) may differ
    # from the reference's; in bf16 one unit near the row's max is about one quantization step.
    ref = x.float() + (res.float() if with_residual else 0)
    ref = ref.to(dtype).float()
    ref = ((ref * torch.rsqrt(ref.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype).float() * w.float()).to(dtype).float()
    ulps = 4 * torch.finfo(dtype).eps * ref.abs()
    assert ((q.float() * scale - ref).abs() <= 0.5 * scale * 1.001 + ulps + 1e-6).all()


def interpreter_checks() -> None:
    for dtype in (torch.float16, torch.float32):
        for rows, n in ((1, 7), (3, 300), (2, 1000)):
            for with_residual in (False, True):
                check_against_separate_kernels(rows, n, dtype, "cpu", with_residual)
    print("interpreter checks passed")


def test_kernel_under_interpreter() -> None:
    assert_passes_under_triton_interpreter("pymllm.tests.test_rms_norm_quant", "interpreter_checks",
                                           printed="interpreter checks passed")


def test_the_dispatcher_declines_what_the_kernel_cannot_run() -> None:
    from pymllm.quantization.kernels.int8_activation_triton import ONE_BLOCK_MAX, rms_norm_quant_int8

    w = torch.ones(64, dtype=torch.bfloat16)
    assert rms_norm_quant_int8(torch.ones(2, 64, dtype=torch.bfloat16), w, 1e-6) is None  # a CPU tensor
    assert rms_norm_quant_int8(torch.ones(2, 3, 64, dtype=torch.bfloat16), w, 1e-6) is None  # not 2-D
    wide = torch.ones(1, ONE_BLOCK_MAX + 1, dtype=torch.bfloat16)
    assert rms_norm_quant_int8(wide, torch.ones(ONE_BLOCK_MAX + 1, dtype=torch.bfloat16), 1e-6) is None


def test_w8a8_layer_behind_a_norm_uses_it(monkeypatch) -> None:
    """W8A8Int8Scheme.apply_rmsnorm: where the fused GEMV is not chosen, the RMSNorm-quantize kernel's
    rows go straight to the int8 matmul, with its residual; the result equals norm, then the layer."""
    from pymllm.layers.fused_ops import rms_norm_reference
    from pymllm.quantization.compressed_tensors.schemes import w8a8_int8
    from pymllm.quantization.kernels.int8_activation_triton import per_token_quant_int8_reference

    scheme = w8a8_int8.W8A8Int8Scheme()
    layer = torch.nn.Module()
    layer.weight_loader = None
    scheme.create_weights(layer, 32, [48], torch.float32)
    layer.weight.data.copy_(torch.randint(-127, 128, (48, 32), dtype=torch.int8))
    layer.weight_scale.data.copy_(torch.rand(48, 1) * 0.01 + 1e-3)
    scheme.process_weights_after_loading(layer)
    x, residual, w = torch.randn(3, 32), torch.randn(3, 32), 1 + 0.1 * torch.randn(32)
    calls = []

    def fake(x_, w_, eps_, residual_):
        calls.append(residual_ is residual)
        summed = x_ + residual_
        return (*per_token_quant_int8_reference(rms_norm_reference(summed, w_, eps_)), summed)

    monkeypatch.setattr(w8a8_int8, "rms_norm_quant_int8", fake)
    out, res_out = scheme.apply_rmsnorm(layer, x, residual, w, 1e-6, None)
    assert calls == [True] and torch.equal(res_out, x + residual)
    want = scheme.apply(layer, rms_norm_reference(x + residual, w, 1e-6), None)
    assert torch.equal(out, want)
    # Where the kernel cannot run, the layer's separate norm-then-apply path runs (None).
    monkeypatch.setattr(w8a8_int8, "rms_norm_quant_int8", lambda *a: None)
    assert scheme.apply_rmsnorm(layer, x, residual, w, 1e-6, None) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_the_separate_kernels(dtype) -> None:
    from pymllm.quantization.kernels.int8_activation_triton import rms_norm_quant_int8

    for rows, n in ((1, 4096), (7, 4096), (2048, 4096), (3, 1000), (1, 12288)):
        for with_residual in (False, True):
            check_against_separate_kernels(rows, n, dtype, "cuda", with_residual)
    x = torch.randn(1, 4096, dtype=dtype, device="cuda")
    assert rms_norm_quant_int8(x, torch.ones(4096, dtype=dtype, device="cuda"), 1e-6) is not None
