"""Dispatch of the fused (RMSNorm / SiLU-and-mul / int8-quantizing) decode GEMVs, on CPU.

The kernels are CUDA-only; here their PyTorch references stand in for them (mllm_kernel's own
tests hold the kernels to those references on the GPU), so what is checked is the routing: a
layer takes the fused kernel exactly where the measured decisions picked the GEMV over the GEMM
and the fused kernel over the separate ones, falls back to norm-then-layer otherwise, and both
routes give the same numbers.
"""

from __future__ import annotations

import pytest
import torch

from mllm_kernel.cuda.jit import gemv_kernels
from pymllm.layers.kernels import fused_gemv
from pymllm.layers.kernels.gemv_dispatch import CHOOSER
from pymllm.layers.layernorm import RMSNorm
from pymllm.layers.linear import Linear, MergedLinear

K, N = 64, 48


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """The references as the kernels, and CPU tensors accepted as if they were on the GPU."""
    calls = []

    def record(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(gemv_kernels, "rmsnorm_gemv", record("rmsnorm", gemv_kernels.rmsnorm_gemv_reference))
    monkeypatch.setattr(gemv_kernels, "silu_mul_gemv", record("silu_mul", gemv_kernels.silu_mul_gemv_reference))
    monkeypatch.setattr(gemv_kernels, "gemv_w8a8_dynamic",
                        record("w8a8", gemv_kernels.gemv_w8a8_dynamic_reference))
    monkeypatch.setattr(gemv_kernels, "gemv_gated_silu",
                        record("swiglu", lambda x, w, bias=None, _tiling=0: gemv_kernels.gemv_gated_silu_reference(
                            x, w, bias)))
    monkeypatch.setattr(fused_gemv, "prepare_fused_gemvs", lambda kind, device, dtype: True)
    real_fits = fused_gemv._fits

    def fits_on_cpu(x, w, bias, k_multiple):
        class _Cuda:  # x.is_cuda is the only device condition
            def __init__(self, t):
                self._t = t

            def __getattr__(self, name):
                return True if name == "is_cuda" else getattr(self._t, name)

        return real_fits(_Cuda(x), w, bias, k_multiple)

    monkeypatch.setattr(fused_gemv, "_fits", fits_on_cpu)
    saved = dict(CHOOSER.choices), dict(CHOOSER.tilings)
    yield calls
    for table, before in zip((CHOOSER.choices, CHOOSER.tilings), saved):
        table.clear()
        table.update(before)


def _decide(kind, weight, rows, dtype, gemv: bool, fused: bool = True):
    """The plain GEMV-or-GEMM decision, and the fused-or-separate one of every prologue."""
    shape = (weight.device, dtype, weight.shape[0], weight.shape[1], rows)
    CHOOSER.choices[(kind, *shape)] = gemv
    for prologue in ("none", "rmsnorm", "silu_mul", "swiglu"):
        CHOOSER.choices[(f"{prologue}+{kind}", *shape)] = fused


def _layer(cls, *args):
    torch.manual_seed(0)
    layer = cls(*args, bias=False, params_dtype=torch.bfloat16)
    layer.weight.data.normal_(0, 0.05)
    return layer


def _norm():
    norm = RMSNorm(K, 1e-6)
    norm.weight.data = (1 + 0.1 * torch.randn(K)).to(torch.bfloat16)
    return norm


@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_goes_into_the_gemv_where_the_gemv_won(fused_on_cpu, with_residual):
    layer, norm = _layer(Linear, K, N), _norm()
    x = torch.randn(3, K, dtype=torch.bfloat16)
    residual = torch.randn(3, K, dtype=torch.bfloat16) if with_residual else None
    if residual is None:
        want_y, want_res = layer(norm(x)), x
    else:
        hidden, want_res = norm(x, residual)
        want_y = layer(hidden)

    _decide("dense", layer.weight, 3, torch.bfloat16, gemv=False)  # cuBLAS won: norm, then the layer
    y, res = layer.forward_rmsnorm(x, residual, norm)
    assert fused_on_cpu == []
    torch.testing.assert_close(y, want_y)

    _decide("dense", layer.weight, 3, torch.bfloat16, gemv=True)
    y, res = layer.forward_rmsnorm(x, residual, norm)
    assert fused_on_cpu == ["rmsnorm"]
    torch.testing.assert_close(y, want_y, rtol=2**-7, atol=2**-7)
    assert torch.equal(res, want_res)


def test_no_decision_yet_runs_the_plain_path(fused_on_cpu):
    # The plain path is what measures the decision (the graph runner's eager warm-up).
    layer, norm = _layer(Linear, K, N), _norm()
    x = torch.randn(2, K, dtype=torch.bfloat16)
    layer.forward_rmsnorm(x, None, norm)
    layer.forward_silu_mul(torch.randn(2, 2 * K, dtype=torch.bfloat16))
    assert fused_on_cpu == []


def test_fused_kernel_measured_slower_keeps_the_separate_kernels(fused_on_cpu):
    layer, norm = _layer(Linear, K, N), _norm()
    _decide("dense", layer.weight, 2, torch.bfloat16, gemv=True, fused=False)
    layer.forward_rmsnorm(torch.randn(2, K, dtype=torch.bfloat16), None, norm)
    layer.forward_silu_mul(torch.randn(2, 2 * K, dtype=torch.bfloat16))
    assert fused_on_cpu == []


def test_too_many_rows_for_a_gemv(fused_on_cpu):
    layer, norm = _layer(Linear, K, N), _norm()
    _decide("dense", layer.weight, 16, torch.bfloat16, gemv=True)
    layer.forward_rmsnorm(torch.randn(16, K, dtype=torch.bfloat16), None, norm)
    assert fused_on_cpu == []


def test_silu_mul_goes_into_the_down_projection(fused_on_cpu):
    from pymllm.layers.fused_ops import silu_and_mul

    down = _layer(Linear, K, N)
    gate_up = torch.randn(2, 2 * K, dtype=torch.bfloat16)
    _decide("dense", down.weight, 2, torch.bfloat16, gemv=True)
    y = down.forward_silu_mul(gate_up)
    assert fused_on_cpu == ["silu_mul"]
    torch.testing.assert_close(y, down(silu_and_mul(gate_up)), rtol=2**-7, atol=2**-7)


def test_merged_layer_takes_the_same_route(fused_on_cpu):
    gate_up, norm = _layer(MergedLinear, K, [N, N]), _norm()
    _decide("dense", gate_up.weight, 1, torch.bfloat16, gemv=True)
    y, _ = gate_up.forward_rmsnorm(torch.randn(1, K, dtype=torch.bfloat16), torch.randn(1, K, dtype=torch.bfloat16), norm)
    assert fused_on_cpu == ["rmsnorm"] and y.shape == (1, 2 * N)


def test_w8a8_decode_rows_quantize_inside_the_gemv(fused_on_cpu):
    from pymllm.quantization.compressed_tensors.schemes.w8a8_int8 import W8A8Int8Scheme
    from pymllm.quantization.kernels.int8_activation_triton import per_token_quant_int8_reference

    scheme = W8A8Int8Scheme()
    layer = torch.nn.Module()
    layer.weight_loader = lambda *a: None
    scheme.create_weights(layer, K, [N], torch.bfloat16)
    layer.weight.data = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    layer.weight_scale.data = torch.rand(N, 1) / 100
    scheme.process_weights_after_loading(layer)
    weight_nk = layer.weight.t()
    x = torch.randn(2, K, dtype=torch.bfloat16)

    _decide("w8a8", weight_nk, 2, torch.bfloat16, gemv=True)
    y = scheme.apply(layer, x, None)
    assert fused_on_cpu == ["w8a8"]
    q, s = per_token_quant_int8_reference(x)
    want = gemv_kernels.gemv_w8a8_reference(q, s, weight_nk, layer.weight_scale, torch.bfloat16)
    assert torch.equal(y, want)

    norm = _norm()
    residual = torch.randn(2, K, dtype=torch.bfloat16)
    y, res = scheme.apply_rmsnorm(layer, x, residual, norm.weight, 1e-6, None)
    assert fused_on_cpu[-1] == "w8a8"
    hidden, want_res = norm(x, residual)
    assert torch.equal(res, want_res)
    q, s = per_token_quant_int8_reference(hidden)
    torch.testing.assert_close(y, gemv_kernels.gemv_w8a8_reference(q, s, weight_nk, layer.weight_scale, torch.bfloat16),
                               rtol=2**-4, atol=2**-4)

    _decide("w8a8", weight_nk, 2, torch.bfloat16, gemv=False)
    assert scheme.apply_silu_mul(layer, torch.randn(2, 2 * K, dtype=torch.bfloat16), None) is None


def _mlp():
    from types import SimpleNamespace

    from pymllm.models.llama import DecoderMLP

    config = SimpleNamespace(hidden_size=K, intermediate_size=N, hidden_act="silu", mlp_bias=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            mlp = DecoderMLP(config, None, "mlp")
        finally:
            torch.set_default_dtype(prev)
    for layer in (mlp.gate_up_proj, mlp.down_proj):
        layer.weight.data.normal_(0, 0.05)
    return mlp


def test_silu_mul_becomes_the_gate_up_epilogue_where_it_won(fused_on_cpu):
    from pymllm.layers.fused_ops import silu_and_mul

    mlp, norm = _mlp(), _norm()
    x, residual = torch.randn(2, K, dtype=torch.bfloat16), torch.randn(2, K, dtype=torch.bfloat16)
    hidden, want_res = norm(x, residual)
    want = mlp.down_proj(silu_and_mul(mlp.gate_up_proj(hidden)))
    _decide("dense", mlp.gate_up_proj.weight, 2, torch.bfloat16, gemv=True, fused=False)
    CHOOSER.choices[("swiglu+dense", torch.device("cpu"), torch.bfloat16, 2 * N, K, 2)] = True
    y, res = mlp.forward_prenorm(x, residual, norm)
    assert fused_on_cpu == ["swiglu"]  # the RMSNorm fusion lost: norm, then the gated GEMV, then down
    assert torch.equal(res, want_res)
    torch.testing.assert_close(y, want, rtol=2**-6, atol=2**-6)


def test_norm_fused_into_gate_up_leaves_the_silu_mul_to_the_down_projection(fused_on_cpu):
    mlp, norm = _mlp(), _norm()
    x = torch.randn(1, K, dtype=torch.bfloat16)
    _decide("dense", mlp.gate_up_proj.weight, 1, torch.bfloat16, gemv=True)
    _decide("dense", mlp.down_proj.weight, 1, torch.bfloat16, gemv=True)
    mlp.forward_prenorm(x, None, norm)
    assert fused_on_cpu == ["rmsnorm", "silu_mul"]


def test_gated_gemv_measured_slower_keeps_gemv_then_silu_mul(fused_on_cpu):
    mlp = _mlp()
    _decide("dense", mlp.gate_up_proj.weight, 2, torch.bfloat16, gemv=True, fused=False)
    assert mlp.gate_up_proj.forward_swiglu(torch.randn(2, K, dtype=torch.bfloat16)) is None
    assert fused_on_cpu == []


def test_swiglu_is_measured_at_every_gated_tiling(fused_on_cpu, monkeypatch):
    # No decision yet: the chooser times the separate pair ("gemm" side) against the gated GEMV
    # at each of its tilings and keeps the fastest tiling.
    from pymllm.layers.kernels import gemv_dispatch

    mlp = _mlp()
    _decide("dense", mlp.gate_up_proj.weight, 2, torch.bfloat16, gemv=True, fused=False)
    key = ("swiglu+dense", torch.device("cpu"), torch.bfloat16, 2 * N, K, 2)
    del CHOOSER.choices[key]
    timed = []
    fast = {"gemv:14": 1.0, "gemv:4": 2.0, "gemv:2": 3.0, "gemv:12": 4.0, "gemm": 5.0}

    def timer(impl, calls):
        timed.append(impl)
        return fast[impl]

    monkeypatch.setattr(CHOOSER, "_timer", timer)
    monkeypatch.setattr(gemv_dispatch.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gemv_kernels, "gemv", lambda x, w, bias=None, _tiling=0: gemv_kernels.gemv_reference(x, w, bias))
    act = mlp.gate_up_proj.forward_swiglu(torch.randn(2, K, dtype=torch.bfloat16))
    assert sorted(timed) == sorted(fast) and CHOOSER.choices[key] and CHOOSER.tiling(key) == 14
    assert act.shape == (2, N) and fused_on_cpu == ["swiglu"]


def test_fused_readiness_is_settled_once(monkeypatch):
    # The fused entries ask on every decode call: after the first answer no kernel is prepared again.
    asked = []

    def prepare(kind, device, dtype, self_test):
        asked.append(kind)
        return False

    monkeypatch.setattr(fused_gemv, "prepare_kernel", prepare)
    monkeypatch.setattr(fused_gemv, "_fused_ready", {})
    cpu = torch.device("cpu")
    assert fused_gemv.prepare_fused_gemvs("dense", cpu, torch.bfloat16) is False
    assert asked == ["rmsnorm GEMV", "silu_mul GEMV", "swiglu GEMV"]
    assert fused_gemv.prepare_fused_gemvs("dense", cpu, torch.bfloat16) is False
    assert fused_gemv.prepare_fused_gemvs("w8a8", cpu, torch.bfloat16) is False
    assert asked[3:] == ["w8a8_dynamic GEMV"]
