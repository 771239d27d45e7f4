"""The RMSNorm and the SiLU-and-mul that quantize their own output per token
(int8_activation_triton.rms_norm_quant_int8 / silu_mul_quant_int8), which a W8A8 layer behind a
pre-norm or in down_proj's place uses instead of two launches: against the two separate Triton
kernels (bit for bit in the interpreter; on the GPU, where the compiled RMSNorm may round a rare
element one unit differently, within one quantization step on a few elements), against a float
reference, and the scheme's wiring."""

from __future__ import annotations

import pytest
import torch

from pymllm.tests.helpers import assert_passes_under_triton_interpreter


def assert_same_quantization(q, scale, want_q, want_scale, dtype: torch.dtype, exact: bool) -> None:
    assert q.dtype == torch.int8 and q.shape == want_q.shape and scale.shape == want_scale.shape
    if exact:
        assert torch.equal(q, want_q) and torch.equal(scale, want_scale)
        return
    # Seen on an H200 (run T11): 2-4 of 8.4M elements one step apart at 2048 rows, scales equal.
    steps = (q.int() - want_q.int()).abs()
    assert steps.max().item() <= 1
    assert (steps > 0).sum().item() <= q.numel() // 100_000 + 2
    assert torch.allclose(scale, want_scale, rtol=torch.finfo(dtype).eps, atol=0)


def assert_close_to_float(q, scale, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Half a quantization step of rounding, plus the few units in the last place by which the
    kernel's RMSNorm or SiLU (its own sum order, approximate rsqrt / exp) may differ from the
    reference's; in bf16 one unit near the row's max is about one quantization step."""
    ulps = 4 * torch.finfo(dtype).eps * ref.abs()
    assert ((q.float() * scale - ref).abs() <= 0.5 * scale * 1.001 + ulps + 1e-6).all()


def check_rms_norm_quant(rows: int, n: int, dtype: torch.dtype, device: str, with_residual: bool) -> None:
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
    assert_same_quantization(q, scale, want_q, want_scale, dtype, exact=device == "cpu")
    if with_residual:
        assert torch.equal(res_out, want_res)
    else:
        assert res_out is x  # as norm_with_residual: the block's input is its residual
    assert torch.equal(x, x_before)
    ref = x.float() + (res.float() if with_residual else 0)
    ref = ref.to(dtype).float()
    ref = ((ref * torch.rsqrt(ref.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype).float() * w.float()).to(dtype).float()
    assert_close_to_float(q, scale, ref, dtype)


def check_silu_mul_quant(rows: int, d: int, dtype: torch.dtype, device: str) -> None:
    from pymllm.layers.kernels.norm_act_triton import silu_and_mul
    from pymllm.quantization.kernels.int8_activation_triton import (
        per_token_quant_int8_triton, silu_mul_quant_int8_triton,
    )

    gen = torch.Generator().manual_seed(rows * 11 + d)
    x = (torch.randn(rows, 2 * d, generator=gen) * 2).to(dtype=dtype, device=device)
    x_before = x.clone()
    q, scale = silu_mul_quant_int8_triton(x)
    want_q, want_scale = per_token_quant_int8_triton(silu_and_mul(x))
    assert_same_quantization(q, scale, want_q, want_scale, dtype, exact=device == "cpu")
    assert torch.equal(x, x_before)
    gate, up = x[:, :d].float(), x[:, d:].float()
    ref = (torch.nn.functional.silu(gate).to(dtype).float() * up).to(dtype).float()
    assert_close_to_float(q, scale, ref, dtype)


def interpreter_checks() -> None:
    for dtype in (torch.float16, torch.float32):
        for rows, n in ((1, 7), (3, 300), (2, 1000)):
            for with_residual in (False, True):
                check_rms_norm_quant(rows, n, dtype, "cpu", with_residual)
            check_silu_mul_quant(rows, n, dtype, "cpu")
    check_silu_mul_quant(1, 3000, torch.bfloat16, "cpu")  # a padded block (4096 lanes for 3000 columns)
    print("interpreter checks passed")


def test_kernels_under_interpreter() -> None:
    assert_passes_under_triton_interpreter("pymllm.tests.test_quantizing_prologues", "interpreter_checks",
                                           printed="interpreter checks passed")


def test_the_dispatchers_decline_what_the_kernels_cannot_run() -> None:
    from pymllm.quantization.kernels.int8_activation_triton import (
        ONE_BLOCK_MAX, rms_norm_quant_int8, silu_mul_quant_int8,
    )

    w = torch.ones(64, dtype=torch.bfloat16)
    assert rms_norm_quant_int8(torch.ones(2, 64, dtype=torch.bfloat16), w, 1e-6) is None  # a CPU tensor
    assert rms_norm_quant_int8(torch.ones(2, 3, 64, dtype=torch.bfloat16), w, 1e-6) is None  # not 2-D
    wide = torch.ones(1, ONE_BLOCK_MAX + 1, dtype=torch.bfloat16)
    assert rms_norm_quant_int8(wide, torch.ones(ONE_BLOCK_MAX + 1, dtype=torch.bfloat16), 1e-6) is None
    # A CPU tensor, with rows enough to pass the row-count test (sm_count_of's nominal 4 off CUDA).
    assert silu_mul_quant_int8(torch.ones(8, 64, dtype=torch.bfloat16)) is None
    assert silu_mul_quant_int8(torch.ones(2, 63, dtype=torch.bfloat16)) is None  # odd width
    assert silu_mul_quant_int8(torch.ones(1, 2 * ONE_BLOCK_MAX + 2, dtype=torch.bfloat16)) is None


def test_the_silu_quantizes_its_output_only_once_the_rows_fill_the_gpu() -> None:
    from pymllm.quantization.kernels.int8_activation_triton import one_kernel_silu_quant_pays

    assert not one_kernel_silu_quant_pays(1, 132)  # decode: two kernels (T12a)
    assert not one_kernel_silu_quant_pays(64, 132)
    assert one_kernel_silu_quant_pays(132, 132) and one_kernel_silu_quant_pays(2048, 132)  # prefill


def test_row_quantizing_programs_take_16_warps_from_4096_columns() -> None:
    from pymllm.quantization.kernels.int8_activation_triton import row_quant_num_warps

    assert row_quant_num_warps(4096, fewest=1) == row_quant_num_warps(16384, fewest=4) == 16  # T92/T93
    assert row_quant_num_warps(2048, fewest=1) == 4 and row_quant_num_warps(1024, fewest=1) == 2
    assert row_quant_num_warps(1024, fewest=4) == 4 and row_quant_num_warps(64, fewest=1) == 1


def _tiny_w8a8_layer(k: int, n: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from pymllm.quantization.compressed_tensors.schemes import w8a8_int8

    scheme = w8a8_int8.W8A8Int8Scheme()
    layer = torch.nn.Module()
    layer.weight_loader = None
    scheme.create_weights(layer, k, [n], dtype)
    layer.weight.data = torch.randint(-127, 128, (n, k), dtype=torch.int8).to(device)
    layer.weight_scale.data = (torch.rand(n, 1) * 0.01 + 1e-3).to(device)
    scheme.process_weights_after_loading(layer)
    return scheme, layer


def test_w8a8_layer_behind_a_norm_uses_it(monkeypatch) -> None:
    """W8A8Int8Scheme.apply_rmsnorm: where the fused GEMV is not chosen, the RMSNorm-quantize kernel's
    rows go straight to the int8 matmul, with its residual; the result equals norm, then the layer."""
    from pymllm.layers.fused_ops import rms_norm_reference
    from pymllm.quantization.kernels import int8_activation_triton
    from pymllm.quantization.kernels.int8_activation_triton import per_token_quant_int8_reference

    scheme, layer = _tiny_w8a8_layer(32, 48)
    x, residual, w = torch.randn(3, 32), torch.randn(3, 32), 1 + 0.1 * torch.randn(32)
    calls = []

    def fake(x_, w_, eps_, residual_):
        calls.append(residual_ is residual)
        summed = x_ + residual_
        return (*per_token_quant_int8_reference(rms_norm_reference(summed, w_, eps_)), summed)

    monkeypatch.setattr(int8_activation_triton, "rms_norm_quant_int8", fake)
    out, res_out = scheme.apply_rmsnorm(layer, x, residual, w, 1e-6, None)
    assert calls == [True] and torch.equal(res_out, x + residual)
    want = scheme.apply(layer, rms_norm_reference(x + residual, w, 1e-6), None)
    assert torch.equal(out, want)
    # Where the kernel cannot run, the layer's separate norm-then-apply path runs (None).
    monkeypatch.setattr(int8_activation_triton, "rms_norm_quant_int8", lambda *a: None)
    assert scheme.apply_rmsnorm(layer, x, residual, w, 1e-6, None) is None


def test_w8a8_down_proj_uses_the_quantizing_silu(monkeypatch) -> None:
    """W8A8Int8Scheme.apply_silu_mul: where the fused GEMV is not chosen, the SiLU-and-mul-quantize
    kernel's rows go straight to the int8 matmul (3-D activations too); the result equals the
    product, then the layer. Where it cannot run, None: Linear.forward_silu_mul runs the two steps."""
    from pymllm.layers.fused_ops import silu_and_mul_reference
    from pymllm.quantization.kernels import int8_activation_triton
    from pymllm.quantization.kernels.int8_activation_triton import per_token_quant_int8_reference

    scheme, layer = _tiny_w8a8_layer(32, 48)
    x = torch.randn(2, 3, 64)
    shapes = []

    def fake(x_):
        shapes.append(tuple(x_.shape))
        return per_token_quant_int8_reference(silu_and_mul_reference(x_))

    monkeypatch.setattr(int8_activation_triton, "silu_mul_quant_int8", fake)
    out = scheme.apply_silu_mul(layer, x, None)
    assert shapes == [(6, 64)] and out.shape == (2, 3, 48)
    assert torch.equal(out, scheme.apply(layer, silu_and_mul_reference(x), None))
    monkeypatch.setattr(int8_activation_triton, "silu_mul_quant_int8", lambda *a: None)
    assert scheme.apply_silu_mul(layer, x, None) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_rms_norm_quant_matches_the_separate_kernels(dtype) -> None:
    from pymllm.quantization.kernels.int8_activation_triton import rms_norm_quant_int8

    for rows, n in ((1, 4096), (7, 4096), (2048, 4096), (3, 1000), (1, 12288)):
        for with_residual in (False, True):
            check_rms_norm_quant(rows, n, dtype, "cuda", with_residual)
    x = torch.randn(1, 4096, dtype=dtype, device="cuda")
    assert rms_norm_quant_int8(x, torch.ones(4096, dtype=dtype, device="cuda"), 1e-6) is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_silu_mul_quant_matches_the_separate_kernels(dtype) -> None:
    from pymllm.quantization.kernels.int8_activation_triton import silu_mul_quant_int8

    for rows, d in ((1, 12288), (7, 12288), (2048, 12288), (3, 1000), (1, 16384)):
        check_silu_mul_quant(rows, d, dtype, "cuda")
    assert silu_mul_quant_int8(torch.randn(4096, 2048, dtype=dtype, device="cuda")) is not None
    assert silu_mul_quant_int8(torch.randn(1, 24576, dtype=dtype, device="cuda")) is None  # decode: two kernels


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 300])  # a decode row (two kernels) and a prefill-sized batch (one)
def test_gpu_w8a8_layer_through_its_prologues(rows) -> None:
    """The scheme's wiring with the real kernels on the GPU: a W8A8 layer behind a norm and in
    down_proj's place gives what norm / SiLU-and-mul, then the layer give, within one quantization
    step of its input rows (the GEMV or the int8 GEMM, whichever the dispatch picks). At 300 rows the
    SiLU quantizes its own output; at one row the fused GEMV runs where it measured faster, else the
    scheme returns None and the layer runs SiLU-and-mul and apply itself."""
    from pymllm.layers.fused_ops import fused_add_rms_norm, silu_and_mul
    from pymllm.quantization.kernels.int8_activation_triton import one_kernel_silu_quant_pays
    from pymllm.quantization.kernels.triton_common import sm_count_of

    torch.manual_seed(rows)
    scheme, layer = _tiny_w8a8_layer(256, 192, "cuda", torch.bfloat16)
    x = torch.randn(rows, 256, dtype=torch.bfloat16, device="cuda")
    residual = torch.randn(rows, 256, dtype=torch.bfloat16, device="cuda")
    w = (1 + 0.1 * torch.randn(256, device="cuda")).to(torch.bfloat16)
    normed, want_res = fused_add_rms_norm(x, residual, w, 1e-6)
    fused = scheme.apply_rmsnorm(layer, x, residual, w, 1e-6, None)
    assert fused is not None
    out, res_out = fused
    assert torch.equal(res_out, want_res)
    want = scheme.apply(layer, normed, None)
    # One int8 step on an input element moves an output by |w| * scale_x * scale_w at most.
    bound = (127 * layer.weight_scale.float().max() * normed.float().abs().amax(-1, keepdim=True) / 127.5).max()
    assert (out.float() - want.float()).abs().max() <= 2 * bound + 1e-2 * want.float().abs().max()
    gate_up = torch.randn(rows, 512, dtype=torch.bfloat16, device="cuda")
    got = scheme.apply_silu_mul(layer, gate_up, None)
    product = silu_and_mul(gate_up)
    want = scheme.apply(layer, product, None)
    bound = (127 * layer.weight_scale.float().max() * product.float().abs().amax(-1, keepdim=True) / 127.5).max()
    if got is None:  # a decode row where the measured decision kept the separate kernels: the layer runs them
        assert not one_kernel_silu_quant_pays(rows, sm_count_of(gate_up.device))
    else:
        assert (got.float() - want.float()).abs().max() <= 2 * bound + 1e-2 * want.float().abs().max()
