"""Programmatic dependent launch: the policy (CPU) and, on an SM90+ GPU (marked gpu), a chain of
dependent decode kernels captured in a CUDA graph with PDL against the same chain launched
plainly, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from mllm_kernel_test_utils import assert_bitwise_equal

from mllm_kernel import pdl


@pytest.fixture
def fresh_policy(monkeypatch):
    """A clean capability cache and the switch restored afterwards."""
    monkeypatch.setattr(pdl, "_capable", {})
    enabled = pdl.is_enabled()
    yield
    pdl.set_enabled(enabled)


@pytest.mark.parametrize("capability, expected", [((8, 0), False), ((8, 7), False), ((8, 9), False),
                                                  ((9, 0), True), ((10, 0), True), ((12, 1), True)])
def test_capability_gate(capability, expected) -> None:
    assert pdl.capability_supports_pdl(capability) is expected


def test_cpu_tensors_never_use_pdl(fresh_policy) -> None:
    pdl.set_enabled(True)
    assert pdl.use_pdl(torch.device("cpu")) is False


def test_decision_follows_capability_and_switch(fresh_policy, monkeypatch) -> None:
    capabilities = {0: (9, 0), 1: (8, 7)}
    asked = []

    def capability(index):
        asked.append(index)
        return capabilities[index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    pdl.set_enabled(True)
    assert pdl.use_pdl(torch.device("cuda", 0)) is True
    assert pdl.use_pdl(torch.device("cuda", 1)) is False  # Jetson Orin: plain launches
    assert pdl.use_pdl(torch.device("cuda", 0)) is True
    assert asked == [0, 1], "the capability is asked once per device"
    pdl.set_enabled(False)
    assert pdl.is_enabled() is False
    assert pdl.use_pdl(torch.device("cuda", 0)) is False


@pytest.mark.parametrize("value, expected", [(None, True), ("0", True), ("1", False), ("true", False)])
def test_environment_switch(value, expected) -> None:
    env = {key: v for key, v in os.environ.items() if key != pdl.DISABLE_ENV}
    if value is not None:
        env[pdl.DISABLE_ENV] = value
    out = subprocess.run([sys.executable, "-c", "from mllm_kernel import pdl; print(pdl.is_enabled())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(expected)


def pdl_device_or_skip() -> torch.device:
    """The CUDA device with PDL switched on; skips the test where the GPU cannot launch dependents."""
    cuda = torch.device("cuda")
    pdl.set_enabled(True)
    if not pdl.use_pdl(cuda):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    return cuda


def random_w4a16(count: int, k: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device):
    """``count`` random square [K/8, K] int4 weights with group-128 scales that keep a chain's
    activations of order one: (packed weights, scales)."""
    q4 = [torch.randint(-2**31, 2**31, (k // 8, k), generator=gen, dtype=torch.int64).to(torch.int32).to(device)
          for _ in range(count)]
    scales = [(torch.rand(k // 128, k, generator=gen) / (4 * k**0.5)).to(dtype=dtype, device=device)
              for _ in range(count)]
    return q4, scales


def assert_pdl_graph_equals_plain(chain, new_inputs) -> None:
    """Capture ``chain`` (returning its output tensors) with PDL on and compare its replays bit for
    bit with the same chain launched plainly: once into NaN-poisoned outputs, then for three
    rounds of ``new_inputs()`` with replays back to back."""
    pdl.set_enabled(False)
    expected = chain()
    pdl.set_enabled(True)
    chain()  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain()
    for out in outs:
        out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, expected):
        assert torch.isfinite(want).all()
        assert_bitwise_equal(got, want)
    for _ in range(3):
        new_inputs()
        pdl.set_enabled(False)
        expected = chain()
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, expected):
            assert torch.isfinite(want).all()
            assert_bitwise_equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("early_dependents", [False, True])
def test_dependent_chain_in_a_graph_equals_plain_launches(fresh_policy, early_dependents) -> None:
    """Each kernel reads the output of the one before it. Under PDL a kernel starts before its
    predecessor has finished and must wait before reading activations; a missing or misplaced
    wait reads stale or half-written rows and shows up as differing bits here. The W4A16 register
    kernel lets the next kernel launch after its k loop or (one-wave grids) at its start."""
    from mllm_kernel import gemv
    from mllm_kernel.cuda.jit.gemv_kernels import gemv_gated_silu, gemv_w8a8_dynamic, rmsnorm_gemv, silu_mul_gemv
    from mllm_kernel.cuda.jit.w4a16_gemv import w4a16_gemv

    cuda = pdl_device_or_skip()
    dtype, k = torch.bfloat16, 2048
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=cuda)

    dense = [randn(k, k, scale=k**-0.5) for _ in range(3)]
    gate_up = randn(2 * k, k, scale=k**-0.5)
    norm_w = randn(k).abs() + 0.5
    q8 = torch.randint(-128, 128, (k, k), generator=gen, dtype=torch.int8).to(cuda)
    q8_scale = (torch.rand(k, generator=gen) / (30 * k**0.5)).to(cuda)
    # W4A16 back to back with split K: both launches share the split-K workspace, which the
    # second may touch only after the first has finished with it.
    q4, q4_scales = random_w4a16(2, k, gen, dtype, cuda)
    x = randn(2, k)
    residual = randn(2, k)

    def chain():
        h = gemv(x, dense[0])
        h = w4a16_gemv(h, q4[0], q4_scales[0], None, 128, splits=4, early_dependents=early_dependents)
        h = w4a16_gemv(h, q4[1], q4_scales[1], None, 128, splits=8, early_dependents=early_dependents)
        h = gemv_gated_silu(h, gate_up)
        h, res = rmsnorm_gemv(h, residual, norm_w, 1e-6, gate_up)
        h = silu_mul_gemv(h, dense[1])
        h = gemv_w8a8_dynamic(h, q8, q8_scale, dtype, prologue="rmsnorm", residual=res, norm_weight=norm_w)[0]
        return gemv(h, dense[2], _tiling=14), res

    def new_inputs():
        x.copy_(randn(2, k))
        residual.copy_(randn(2, k))

    assert_pdl_graph_equals_plain(chain, new_inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("early_dependents", [False, True])
def test_one_row_w4a16_chain_in_a_graph_equals_plain_launches(fresh_policy, early_dependents) -> None:
    """The one-row W4A16 kernel copies its first weights before its PDL wait (early_weights) and its
    activations after it, and lets the next kernel launch after its k loop or at its start
    (early_dependents): chained one-row launches under PDL, split K sharing the workspace and
    both block sizes, equal plain launches bit for bit."""
    from mllm_kernel import gemv
    from mllm_kernel.cuda.jit.w4a16_gemv import w4a16_gemv

    cuda = pdl_device_or_skip()
    dtype, k = torch.bfloat16, 4096
    gen = torch.Generator().manual_seed(1)
    dense = (torch.randn(k, k, generator=gen) * k**-0.5).to(dtype=dtype, device=cuda)
    q4, q4_scales = random_w4a16(3, k, gen, dtype, cuda)
    x = torch.randn(1, k, generator=gen).to(dtype=dtype, device=cuda)

    def chain():
        h = gemv(x, dense)
        h = w4a16_gemv(h, q4[0], q4_scales[0], None, 128, one_row_warps=16, splits=2,
                       early_dependents=early_dependents)
        h = w4a16_gemv(h, q4[1], q4_scales[1], None, 128, one_row_warps=8, splits=3,
                       early_dependents=early_dependents)
        return (w4a16_gemv(h, q4[2], q4_scales[2], None, 128, early_dependents=early_dependents),)  # planned

    assert_pdl_graph_equals_plain(
        chain, lambda: x.copy_(torch.randn(1, k, generator=gen).to(dtype=dtype, device=cuda)))
