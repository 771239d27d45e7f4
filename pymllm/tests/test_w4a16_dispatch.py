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
    FUSED_MAX_M,
    GEMM_MAX_M,
    GEMM_MIN_M,
    GEMV_MAX_M,
    TRITON_MAX_M,
    choose_w4a16_kernel,
    prepare_w4a16_gemm,
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
    # Past the GEMV's rows, even if gemv_ok were claimed: Triton small-M (up to its rows), then
    # dequantize + cuBLAS.
    past_gemv = "triton_small_m" if GEMV_MAX_M < TRITON_MAX_M else "dequant_cublas"
    assert choose_w4a16_kernel(GEMV_MAX_M + 1, sm80=True, gemv_ok=True, triton_ok=True) == past_gemv
    assert choose_w4a16_kernel(TRITON_MAX_M, sm80=True, gemv_ok=False, triton_ok=True) == "triton_small_m"
    assert choose_w4a16_kernel(TRITON_MAX_M + 1, sm80=True, gemv_ok=False, triton_ok=True) == "dequant_cublas"
    assert choose_w4a16_kernel(2048, sm80=True, gemv_ok=False, triton_ok=False) == "reference"
    # 65..FUSED_MAX_M rows: the large-M Triton kernel where it measures faster; the measurement is
    # asked for only there.
    asked = []

    def faster(answer):
        return lambda: asked.append(answer) or answer

    for m in (TRITON_MAX_M + 1, FUSED_MAX_M):
        assert choose_w4a16_kernel(m, True, True, True, faster(True)) == "triton_large_m"
        assert choose_w4a16_kernel(m, True, True, True, faster(False)) == "dequant_cublas"
    assert choose_w4a16_kernel(FUSED_MAX_M + 1, True, True, True, faster(True)) == "dequant_cublas"
    assert choose_w4a16_kernel(TRITON_MAX_M, True, False, True, faster(True)) == "triton_small_m"
    assert choose_w4a16_kernel(FUSED_MAX_M, True, True, False, faster(True)) == "reference"
    assert asked == [True, False, True, False]
    # CPU / pre-SM80 GPUs and empty inputs: the reference.
    assert choose_w4a16_kernel(1, sm80=False, gemv_ok=True, triton_ok=True) == "reference"
    assert choose_w4a16_kernel(0, sm80=True, gemv_ok=True, triton_ok=True) == "reference"


def test_w4a16_gemm_choice():
    asked = []

    def faster(answer):
        return lambda rival: asked.append(rival) or answer

    # Below GEMM_MIN_M the GEMV runs without a measurement, even where the GEMM is ready.
    assert choose_w4a16_kernel(GEMM_MIN_M - 1, True, True, True, gemm_ok=True, gemm_faster=faster(True)) == "cuda_gemv"
    assert asked == []
    # GEMM_MIN_M..64 rows: measured against the GEMV, or against Triton's small-M kernel without the GEMV.
    for answer, want in ((True, "cuda_gemm"), (False, "cuda_gemv")):
        for m in (GEMM_MIN_M, GEMV_MAX_M):
            assert choose_w4a16_kernel(m, True, True, True, gemm_ok=True, gemm_faster=faster(answer)) == want
    assert choose_w4a16_kernel(48, True, False, True, gemm_ok=True, gemm_faster=faster(False)) == "triton_small_m"
    assert asked == ["cuda_gemv"] * 4 + ["triton_small_m"]
    asked.clear()
    # 65..GEMM_MAX_M: against whichever of the large-M kernel and dequantize + cuBLAS was chosen.
    assert choose_w4a16_kernel(100, True, True, True, lambda: True, True, faster(False)) == "triton_large_m"
    assert choose_w4a16_kernel(100, True, True, True, lambda: False, True, faster(True)) == "cuda_gemm"
    assert choose_w4a16_kernel(GEMM_MAX_M, True, True, True, lambda: False, True, faster(False)) == "dequant_cublas"
    assert asked == ["triton_large_m", "dequant_cublas", "dequant_cublas"]
    # Without Triton the GEMM needs no measurement against the reference; past its rows it is not asked.
    assert choose_w4a16_kernel(200, True, False, False, gemm_ok=True, gemm_faster=faster(False)) == "cuda_gemm"
    assert choose_w4a16_kernel(GEMM_MAX_M + 1, True, True, True, gemm_ok=True, gemm_faster=faster(True)) == "dequant_cublas"
    assert choose_w4a16_kernel(100, False, True, True, gemm_ok=True, gemm_faster=faster(True)) == "reference"
    assert len(asked) == 3


def test_w4a16_gemm_limits_are_within_the_kernel():
    gemm_module = pytest.importorskip("mllm_kernel.cuda.jit.w4a16_gemm")
    assert 1 < GEMM_MIN_M <= GEMV_MAX_M < GEMM_MAX_M
    assert gemm_module.TILE_MS[0] < GEMM_MIN_M


def test_w4a16_triton_limit_mirrors_the_kernel():
    w4a16_triton = pytest.importorskip("pymllm.quantization.kernels.w4a16_triton")
    assert w4a16_triton.MAX_M == TRITON_MAX_M


def test_w4a16_gemv_limit_is_within_the_kernel():
    gemv_module = pytest.importorskip("mllm_kernel.cuda.jit.w4a16_gemv")
    assert GEMV_MAX_M <= gemv_module.MAX_M


def test_w4a16_gemv_prepare_is_off_without_cuda():
    assert prepare_w4a16_gemv(torch.device("cpu"), torch.bfloat16, False) is False
    assert prepare_w4a16_gemv(torch.device("cpu"), torch.float16, True) is False
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    q = torch.zeros(32, 64, dtype=torch.int32)
    s = torch.ones(2, 64, dtype=torch.bfloat16)
    assert w4a16.gemv_fits(x, q, s, None, 128, None) is False  # CPU tensors
    assert prepare_w4a16_gemm(torch.device("cpu"), torch.bfloat16, True) is False
    assert w4a16.gemm_fits(x.expand(32, 256), q, s, None, 128, None) is False


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
    reference_module = pytest.importorskip("mllm_kernel.cuda.jit.w4a16_reference")
    calls = []

    def fake_gemv(x, qweight, scales, zeros, group, bias=None, out=None, splits=None, validate=True, gated=False):
        if gated:
            calls.append(("gated", tuple(x.shape), validate))
            return reference_module.w4a16_gemv_gated_reference(x, qweight, scales, zeros, group, bias)
        calls.append((tuple(x.shape), validate))
        return reference_module.w4a16_gemv_reference(x, qweight, scales, zeros, group, bias)

    monkeypatch.setattr(w4a16, "cuda_capability", lambda device: (9, 0))
    monkeypatch.setattr(w4a16, "fast_path_supported", lambda *args: False)
    monkeypatch.setattr(gemv_module, "w4a16_gemv", fake_gemv)
    # gemv_fits checks x.is_cuda and the device; on CPU stand in with the layout checks only.
    monkeypatch.setattr(w4a16, "gemv_fits", lambda x, *rest, gated=False: 1 <= x.shape[0] <= GEMV_MAX_M)
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


@pytest.fixture
def measured(monkeypatch):
    """An SM90 stand-in where the Triton kernels may run (as references) and the decode matmuls'
    chooser times candidates with a scripted timer: records each timed candidate ("gemv": the
    large-M kernel, "gemm": dequantize + cuBLAS) and each kernel run with its rows or columns."""
    pytest.importorskip("triton")
    from pymllm.layers.kernels import gemv_dispatch
    from pymllm.quantization.kernels import w4a16_triton

    log = {"timed": [], "ran": [], "fused_us": 10.0}

    def timer(impl, calls):
        log["timed"].append(impl)
        return (log["fused_us"] if impl == "gemv" else 20.0) * 1e-6

    monkeypatch.setattr(gemv_dispatch, "CHOOSER", gemv_dispatch.GemvChooser(timer))
    monkeypatch.setattr(w4a16, "cuda_capability", lambda device: (9, 0))
    monkeypatch.setattr(w4a16, "gemv_fits", lambda *a, **k: False)
    monkeypatch.setattr(w4a16, "fast_path_supported", lambda *a: True)

    def fake_large(x, qweight, scales, zeros, group, bias=None, config=None, out=None):
        log["ran"].append(("large", x.shape[0]))
        return w4a16_linear_reference(x, qweight, scales, zeros, group, bias)

    def fake_dequantize(qweight, scales, zeros, group, dtype):
        log["ran"].append(("dequantize", qweight.shape[1]))
        return w4a16.dequantize_wna16_reference(qweight, scales, zeros, group, dtype)

    monkeypatch.setattr(w4a16_triton, "w4a16_gemm_large_m", fake_large)
    monkeypatch.setattr(w4a16_triton, "w4a16_dequantize", fake_dequantize)
    return log


def test_w4a16_linear_measures_the_large_m_kernel_once_per_row_bucket(measured):
    # The fused kernel measures faster: 65..80 rows share one measurement, 81 takes another.
    for m in (65, 80, 81):
        args = _layer(m)
        torch.testing.assert_close(w4a16_linear(*args).float(), w4a16_linear_reference(*args).float())
    assert measured["timed"] == ["gemv", "gemm", "gemv", "gemm"]
    assert measured["ran"][-3:] == [("large", 65), ("large", 80), ("large", 81)]
    # Slower (or within 3 %) for another shape: dequantize + cuBLAS, and that choice is kept.
    measured["fused_us"] = 19.9
    measured["ran"].clear()
    for m in (100, 100):
        w4a16_linear(*_layer(m, n=128))
    assert measured["timed"][4:] == ["gemv", "gemm"]
    assert measured["ran"] == [("dequantize", 128), ("dequantize", 128)]
    # Past 128 rows the buckets are 32 wide; past FUSED_MAX_M no measurement: dequantize + cuBLAS.
    assert [w4a16.fused_rows_bucket(m) for m in (65, 128, 129, 160, 161, 256)] == [80, 128, 160, 160, 192, 256]
    w4a16_linear(*_layer(FUSED_MAX_M + 1))
    assert len(measured["timed"]) == 6 and measured["ran"][-1] == ("dequantize", 64)


@pytest.fixture
def gemm_routed(monkeypatch, routed):
    """``routed`` plus the tensor-core GEMM ready for GEMM_MIN_M..GEMM_MAX_M rows, a scripted chooser
    (the GEMM, timed as "gemv", takes 10 us; its rival 20 us, or gemm_us) and recorded GEMM calls."""
    gemm_module = pytest.importorskip("mllm_kernel.cuda.jit.w4a16_gemm")
    from pymllm.layers.kernels import gemv_dispatch

    log = {"timed": [], "gemm": [], "rival_us": 20.0}

    def timer(impl, calls):
        log["timed"].append(impl)
        return (10.0 if impl == "gemv" else log["rival_us"]) * 1e-6

    def fake_gemm(x, qweight, scales, zeros, group, bias=None, out=None, splits=None, tile_m=None, validate=True):
        log["gemm"].append((x.shape[0], qweight.shape[1], validate))
        return w4a16_linear_reference(x, qweight, scales, zeros, group, bias)

    monkeypatch.setattr(gemv_dispatch, "CHOOSER", gemv_dispatch.GemvChooser(timer))
    monkeypatch.setattr(gemm_module, "w4a16_gemm", fake_gemm)
    monkeypatch.setattr(w4a16, "gemm_fits", lambda x, *rest: GEMM_MIN_M <= x.shape[0] <= GEMM_MAX_M)
    return log


def test_w4a16_linear_takes_the_gemm_where_it_measures_faster(gemm_routed, routed):
    for m in (GEMM_MIN_M, GEMM_MIN_M + 3):  # one 16-row bucket: measured once, then kept
        args = _layer(m)
        torch.testing.assert_close(w4a16_linear(*args).float(), w4a16_linear_reference(*args).float())
    assert gemm_routed["timed"] == ["gemv", "gemm"]
    assert gemm_routed["gemm"] == [(GEMM_MIN_M, 64, False), (GEMM_MIN_M + 3, 64, False)] and routed == []
    # Where the GEMV measures faster it stays, and the gated GEMV keeps gate/up layers (measured
    # against the GEMM followed by the SiLU-and-mul).
    gemm_routed["rival_us"] = 10.0
    w4a16_linear(*_layer(64, n=128))
    assert routed == [((64, 256), False)]
    assert w4a16.w4a16_swiglu(*_layer(64, n=128)) is not None and routed[-1][0] == "gated"
    # Where the GEMM won, the gate/up layer declines the gated GEMV: GEMM, then the SiLU-and-mul.
    gemm_routed["rival_us"] = 20.0
    assert w4a16.w4a16_swiglu(*_layer(50, n=256)) is None
    assert len(gemm_routed["gemm"]) == 2
    # Up to 16 rows the GEMV runs unmeasured.
    w4a16_linear(*_layer(GEMM_MIN_M - 1))
    assert routed[-1] == ((GEMM_MIN_M - 1, 256), False) and len(gemm_routed["timed"]) == 8


def test_large_m_tiles_follow_the_sweep(monkeypatch):
    w4a16_triton = pytest.importorskip("pymllm.quantization.kernels.w4a16_triton")
    monkeypatch.setattr(w4a16_triton, "sm_count_of", lambda device: 132)
    cfg = lambda m, n, k: w4a16_triton.large_m_config(m, n, k, torch.device("cuda"))  # noqa: E731
    # Qwen3-8B up to 256 rows (T190's fastest): gate_up unsplit, down split 4, qkv split 4 / 2.
    assert cfg(128, 24576, 4096) == w4a16_triton.LargeMConfig(128, 128, 64, 1, 8, 4, 4)
    assert cfg(128, 4096, 12288) == w4a16_triton.LargeMConfig(128, 128, 64, 4, 8, 4, 4)
    assert cfg(256, 4096, 12288).split_k == 4 and cfg(256, 24576, 4096).split_k == 1
    assert cfg(128, 6144, 4096).split_k == 4 and cfg(256, 6144, 4096).split_k == 2
    assert cfg(64, 6144, 4096).block_m == 64
    # Prefill sizes: 8-warp tiles, no split once the tiles fill the SMs.
    assert cfg(2048, 4096, 4096) == w4a16_triton.LargeMConfig(256, 128, 64, 1, 8, 8, 3)
    # K that a split would not divide stays whole.
    assert cfg(128, 128, 64).split_k == 1


def test_w4a16_linear_on_cpu_uses_the_reference():
    args = _layer(2)
    assert torch.equal(w4a16_linear(*args), w4a16_linear_reference(*args))


def test_w4a16_swiglu_takes_the_gated_gemv_at_decode_rows(routed):
    from pymllm.layers.fused_ops import silu_and_mul_reference

    for m in (1, GEMV_MAX_M):
        x, qweight, scales, zeros, group, bias = _layer(m, n=128)
        got = w4a16.w4a16_swiglu(x, qweight, scales, zeros, group, bias)
        # The oracle in float32: a bf16 CPU matmul rounds its sums, which at 64 rows put a few
        # outputs past the tolerance.
        f32 = [t.float() for t in (x, scales, zeros, bias)]
        want = silu_and_mul_reference(w4a16_linear_reference(f32[0], qweight, f32[1], f32[2], group, f32[3]))
        assert got.shape == (m, 64)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert routed == [("gated", (1, 256), False), ("gated", (GEMV_MAX_M, 256), False)]
    # More rows than the GEMV serves: None, so the layer runs its GEMM and the SiLU-and-mul.
    assert w4a16.w4a16_swiglu(*_layer(GEMV_MAX_M + 1, n=128)) is None
    assert len(routed) == 2


def test_w4a16_swiglu_declines_off_the_gpu_or_before_sm80(monkeypatch):
    args = _layer(1, n=128)
    assert w4a16.w4a16_swiglu(*args) is None  # CPU: gemv_fits says no
    monkeypatch.setattr(w4a16, "cuda_capability", lambda device: (7, 5))
    monkeypatch.setattr(w4a16, "gemv_fits", lambda *a, **k: True)
    assert w4a16.w4a16_swiglu(*args) is None


def test_gate_up_layers_route_swiglu_and_others_do_not(routed):
    from types import SimpleNamespace

    from pymllm.models.llama import DecoderMLP
    from pymllm.tests.test_compressed_tensors_config import W4A16
    from pymllm.tests.test_compressed_tensors_runtime import config_for

    config = SimpleNamespace(hidden_size=256, intermediate_size=128, hidden_act="silu", mlp_bias=False)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        mlp = DecoderMLP(config, config_for(W4A16), "model.layers.0.mlp")
    finally:
        torch.set_default_dtype(prev)
    gen = torch.Generator().manual_seed(5)
    for layer in (mlp.gate_up_proj, mlp.down_proj):
        rows, cols = layer.weight_packed.shape
        layer.weight_packed.data = torch.randint(-2**31, 2**31, (rows, cols), generator=gen, dtype=torch.int64).to(torch.int32)
        layer.weight_scale.data = (torch.rand(*layer.weight_scale.shape, generator=gen) * 0.01).to(torch.bfloat16)
        layer.weight_shape.data = torch.tensor([rows, cols * 8])
        layer.quant_method.process_weights_after_loading(layer)
    assert mlp.gate_up_proj.quant_method.scheme.gate_up and not mlp.down_proj.quant_method.scheme.gate_up
    x = torch.randn(2, 256, generator=gen).to(torch.bfloat16)
    out = mlp(x)
    assert out.shape == (2, 256)
    assert routed[0] == ("gated", (2, 256), False)  # gate/up: the gated GEMV
    assert routed[1] == ((2, 128), False)  # down: the plain GEMV on its product
    assert mlp.down_proj.quant_method.apply_swiglu(mlp.down_proj, torch.zeros(1, 128, dtype=torch.bfloat16),
                                                   None) is None



@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5])
def test_gated_gemv_equals_the_gemv_then_the_silu_mul_kernel_bit_for_bit(m):
    # The epilogue rounds g and u as the plain GEMV stores them and combines them with the Triton
    # SiLU-and-mul kernel's instructions, so swapping the two launches for one changes no bit.
    from pymllm.layers.fused_ops import silu_and_mul

    x, qweight, scales, zeros, group, bias = (t.cuda() if isinstance(t, torch.Tensor) else t
                                              for t in _layer(m, k=4096, n=2 * 3072))
    got = w4a16.w4a16_swiglu(x, qweight, scales, zeros, group, bias)
    assert got is not None, "the gated GEMV did not run"
    assert torch.equal(got, silu_and_mul(w4a16_linear(x, qweight, scales, zeros, group, bias)))


@pytest.mark.gpu
@pytest.mark.parametrize("with_zeros", [False, True])
def test_w4a16_linear_with_and_without_the_gemm_on_gpu(monkeypatch, with_zeros):
    """Real kernels: whichever way the measurement goes, GEMM_MIN_M..GEMM_MAX_M rows match the
    reference, and the tensor-core GEMM runs exactly where it won (a scripted chooser decides)."""
    gemm_module = pytest.importorskip("mllm_kernel.cuda.jit.w4a16_gemm")
    from pymllm.layers.kernels import gemv_dispatch

    ran = []
    real_gemm = gemm_module.w4a16_gemm

    def counted(*args, **kwargs):
        ran.append(args[0].shape[0])
        return real_gemm(*args, **kwargs)

    monkeypatch.setattr(gemm_module, "w4a16_gemm", counted)
    n, k, group = 6144, 4096, 128
    gen = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 256, (k // 8, n, 4), generator=gen, dtype=torch.uint8)
    qweight = raw.view(torch.int32).reshape(k // 8, n).cuda()
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.002).bfloat16().cuda()
    zeros = torch.randint(-8, 8, (k // group, n), generator=gen).bfloat16().cuda() if with_zeros else None
    bias = torch.randn(n, generator=gen).bfloat16().cuda()
    # Prepared (built and self-tested) before counting: the preparation is per device as x has it.
    assert w4a16.prepare_w4a16_gemm(qweight.device, torch.bfloat16, with_zeros)
    for gemm_wins in (True, False):
        def timer(impl, calls, gemm_wins=gemm_wins):  # "gemv" is the candidate side: the GEMM (or large-M Triton)
            return (1.0 if (impl == "gemv") == gemm_wins else 2.0) * 1e-6

        monkeypatch.setattr(gemv_dispatch, "CHOOSER", gemv_dispatch.GemvChooser(timer))
        ran.clear()
        rows = (GEMM_MIN_M, 64, 100, GEMM_MAX_M)
        for m in rows:
            x = torch.randn(m, k, device="cuda").bfloat16()
            got = w4a16_linear(x, qweight, scales, zeros, group, bias).double()
            want = x.double() @ w4a16.dequantize_wna16_reference(qweight, scales, zeros, group, torch.float64)
            want = want + bias.double()
            error = ((got - want).abs().max() / want.abs().max()).item()
            assert error < 1e-2, (m, gemm_wins, error)
        assert ran == (list(rows) if gemm_wins else []), gemm_wins
