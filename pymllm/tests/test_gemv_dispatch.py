"""The decode GEMV dispatcher on CPU: layout checks, the measured choice, and the routing of
dense and W8A8 linears.

The kernels themselves are tested against their references on the GPU
(mllm-kernel/tests/test_gemv.py); here recording stand-ins replace them and a fake timer
replaces the CUDA-graph measurement, so the decisions are checked without CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mllm_kernel.cuda.jit import gemv_kernels
from pymllm.layers.kernels import gemv_dispatch
from pymllm.layers.kernels.gemv_dispatch import GEMV_MAX_ROWS, GemvChooser, dense_linear, gemv_layout_ok, prepare_gemv

_BF16 = dict(dtype=torch.bfloat16)


class FakeTimer:
    """Times each candidate by the impl name it was built for: {"gemv": s, "gemm": s}; a tiled
    candidate "gemv:<t>" takes its own entry if there is one, else the "gemv" time."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, 0

    def __call__(self, impl, calls):
        self.calls += 1
        for call in calls:
            call()
        return self.seconds.get(impl, self.seconds.get(impl.partition(":")[0]))


def test_chooser_measures_once_and_needs_a_clear_win():
    chooser = GemvChooser(timer=FakeTimer({"gemv": 1.0, "gemm": 1.5}))
    w = torch.zeros(16, 8)
    make = lambda impl, weight: (lambda: impl)  # noqa: E731
    key = ("dense", "cuda:0", torch.bfloat16, 16, 8, 1)
    assert chooser.use_gemv(key, w, make) is True
    chooser._timer = FakeTimer({"gemv": 9.0, "gemm": 0.1})
    assert chooser.use_gemv(key, w, make) is True and chooser._timer.calls == 0  # cached
    close = GemvChooser(timer=FakeTimer({"gemv": 1.0, "gemm": 1.01}))
    assert close.use_gemv(key, w, make) is False  # within the 3% margin: keep the GEMM
    assert close.choices == {key: False}


def test_chooser_copies_small_weights_past_l2_and_repeats_calls():
    seen = []

    def timer(impl, calls):
        seen.append(len(calls))
        return 1.0

    chooser = GemvChooser(timer=timer)
    made = []

    def make(impl, weight):
        made.append(weight)
        return lambda: None

    small = torch.zeros(64, 64)  # 16 KiB: as many copies as the graph holds
    chooser.use_gemv(("dense", "cpu", torch.float32, 64, 64, 1), small, make)
    assert seen == [gemv_dispatch._CALLS_PER_GRAPH] * 2
    assert made[0] is small and all(w.data_ptr() != small.data_ptr() for w in made[1:gemv_dispatch._CALLS_PER_GRAPH])


def test_chooser_keeps_the_fastest_tiling():
    seconds = {"gemv:4": 1.0, "gemv:2": 0.8, "gemv:14": 0.6, "gemv:11": 0.9, "gemm": 0.7}
    chooser = GemvChooser(timer=FakeTimer(seconds))
    w = torch.zeros(16, 8)
    key = ("dense", "cuda:0", torch.bfloat16, 16, 8, 1)
    made = []

    def make(impl, weight):
        made.append(impl)
        return lambda: None

    # 0.7 us of GEMM against 0.6 for the best tiling: more than the 3 % margin, so the GEMV.
    assert chooser.use_gemv(key, w, make, tilings=(4, 2, 14, 11)) is True
    assert chooser.tiling(key) == 14 and chooser.tilings == {key: 14}
    assert set(made) == {"gemv:4", "gemv:2", "gemv:14", "gemv:11", "gemm"}
    # Without tilings the plain candidate is measured and no tiling is recorded.
    plain = GemvChooser(timer=FakeTimer({"gemv": 1.0, "gemm": 2.0}))
    assert plain.use_gemv(key, w, make) is True and plain.tiling(key) == 0 and plain.tilings == {}
    assert gemv_dispatch.tiling_of("gemv:14") == 14 and gemv_dispatch.tiling_of("gemv") == 0


def test_fastest_tiling_runs_the_layer(on_fake_gpu, monkeypatch):
    calls, _ = on_fake_gpu
    chooser = GemvChooser(timer=FakeTimer({"gemv": 1.0, "gemv:11": 0.5, "gemm": 2.0}))
    monkeypatch.setattr(gemv_dispatch, "CHOOSER", chooser)
    x, w = torch.randn(1, 64, **_BF16), torch.randn(8, 64, **_BF16)
    dense_linear(x, w)
    calls.clear()
    dense_linear(x, w)
    assert calls == [("gemv", (1, 64), 11)]


def test_prepare_is_off_without_cuda():
    assert prepare_gemv("dense", torch.device("cpu"), torch.bfloat16) is False
    assert prepare_gemv("w8a8", torch.device("cpu"), torch.float16) is False


def test_layout_conditions():
    w = torch.zeros(32, 64, **_BF16)
    assert gemv_layout_ok(torch.zeros(4, 64, **_BF16), w, 8)
    assert not gemv_layout_ok(torch.zeros(GEMV_MAX_ROWS + 1, 64, **_BF16), w, 8)
    assert not gemv_layout_ok(torch.zeros(0, 64, **_BF16), w, 8)
    assert not gemv_layout_ok(torch.zeros(4, 64, **_BF16), w.t().contiguous().t(), 8)
    assert not gemv_layout_ok(torch.zeros(4, 128, **_BF16)[:, ::2], w, 8)
    # A row stride of 36 bf16 = 72 bytes breaks the 16-byte row alignment.
    assert not gemv_layout_ok(torch.zeros(4, 36, **_BF16)[:, :32], torch.zeros(8, 32, **_BF16), 8)
    assert not gemv_layout_ok(torch.zeros(2, 40, **_BF16), torch.zeros(8, 40, **_BF16), 16)


def test_cpu_takes_linear():
    x, w = torch.randn(2, 64, **_BF16), torch.randn(16, 64, **_BF16)
    assert torch.equal(dense_linear(x, w), F.linear(x, w))


@pytest.fixture
def on_fake_gpu(monkeypatch):
    """Pretend x is a CUDA tensor with usable kernels; record kernel calls, answer with references."""
    calls = []

    def fake_gemv(x, w, bias=None, _tiling=0):
        calls.append(("gemv", tuple(x.shape), _tiling))
        return gemv_kernels.gemv_reference(x, w, bias)

    def fake_w8a8(x_q, x_scale, w, w_scale, out_dtype, bias=None, _tiling=0):
        calls.append(("gemv_w8a8", tuple(x_q.shape), _tiling))
        return gemv_kernels.gemv_w8a8_reference(x_q, x_scale, w, w_scale, out_dtype, bias)

    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(gemv_dispatch, "prepare_gemv", lambda kind, device, dtype: True)
    monkeypatch.setattr(gemv_kernels, "gemv", fake_gemv)
    monkeypatch.setattr(gemv_kernels, "gemv_w8a8", fake_w8a8)
    chooser = GemvChooser(timer=FakeTimer({"gemv": 1.0, "gemm": 2.0}))
    monkeypatch.setattr(gemv_dispatch, "CHOOSER", chooser)
    return calls, chooser


def test_decode_rows_route_to_the_faster_gemv(on_fake_gpu):
    calls, chooser = on_fake_gpu
    w, bias = torch.randn(24, 64, **_BF16), torch.randn(24, **_BF16)
    x = torch.randn(3, 64, **_BF16)
    out = dense_linear(x, w, bias)
    # Every tiling measured alike: the first of the fastest (TILINGS[0]) runs.
    assert ("gemv", (3, 64), gemv_kernels.TILINGS[0]) in calls and len(chooser.choices) == 1
    assert torch.allclose(out.float(), F.linear(x, w, bias).float(), rtol=2**-7, atol=2**-6)
    assert dense_linear(x.unsqueeze(1), w).shape == (3, 1, 24)  # leading dims kept


def test_slower_gemv_is_not_used(on_fake_gpu, monkeypatch):
    calls, _ = on_fake_gpu
    monkeypatch.setattr(gemv_dispatch, "CHOOSER", GemvChooser(timer=FakeTimer({"gemv": 2.0, "gemm": 1.0})))
    x, w = torch.randn(1, 64, **_BF16), torch.randn(8, 64, **_BF16)
    calls.clear()
    assert torch.equal(dense_linear(x, w), F.linear(x, w))
    # only the measurement ran it, once per tiling
    assert len(calls) == len(gemv_kernels.TILINGS) * gemv_dispatch._CALLS_PER_GRAPH
    calls.clear()
    dense_linear(x, w)
    assert calls == []


@pytest.mark.parametrize(
    "x, w, bias",
    [
        (torch.randn(GEMV_MAX_ROWS + 1, 64, **_BF16), torch.randn(8, 64, **_BF16), None),
        (torch.randn(2, 64, **_BF16), torch.randn(64, 8, **_BF16).t(), None),
        (torch.randn(2, 64, **_BF16), torch.randn(8, 64, **_BF16), torch.randn(16, **_BF16)[::2]),
    ],
    ids=["prefill-rows", "transposed-weight", "strided-bias"],
)
def test_other_inputs_take_linear(on_fake_gpu, x, w, bias):
    calls, chooser = on_fake_gpu
    assert torch.equal(dense_linear(x, w, bias), F.linear(x, w, bias))
    assert calls == [] and chooser.choices == {}


def test_w8a8_scheme_routes_decode_rows(on_fake_gpu, monkeypatch):
    from pymllm.quantization.compressed_tensors.schemes import w8a8_int8
    from pymllm.quantization.kernels.int8_activation_triton import per_token_quant_int8_reference
    from pymllm.quantization.kernels.int8_scaled_mm import int8_scaled_mm_float

    calls, chooser = on_fake_gpu
    monkeypatch.setattr(w8a8_int8, "per_token_quant_int8", per_token_quant_int8_reference)
    monkeypatch.setattr(w8a8_int8, "int8_scaled_mm", int8_scaled_mm_float)
    scheme = w8a8_int8.W8A8Int8Scheme()
    layer = torch.nn.Module()
    layer.weight_loader = lambda *a, **k: None
    scheme.create_weights(layer, 64, [32], torch.bfloat16)
    layer.weight.data.copy_(torch.randint(-128, 128, (32, 64), dtype=torch.int8))
    layer.weight_scale.data.copy_(torch.rand(32, 1) / 100)
    scheme.process_weights_after_loading(layer)
    x = torch.randn(2, 64, **_BF16)
    decode = scheme.apply(layer, x, None)
    assert ("gemv_w8a8", (2, 64), gemv_kernels.TILINGS[0]) in calls
    q, scale = per_token_quant_int8_reference(x)
    # Same integer products and epilogue as the int8 GEMM it replaces.
    assert torch.equal(decode, int8_scaled_mm_float(q, layer.weight, scale, layer.weight_scale, torch.bfloat16))
    calls.clear()
    prefill = scheme.apply(layer, torch.randn(GEMV_MAX_ROWS + 4, 64, **_BF16), None)
    assert calls == [] and prefill.shape == (GEMV_MAX_ROWS + 4, 32)
