"""The int8 GEMM family of W8A8: CUTLASS kernels, their build, the Triton small-M kernel,
per-token activation quantization and the dispatcher with its fallbacks.

CPU: header discovery, argument checks, references, Triton kernels in the interpreter (in a
subprocess: TRITON_INTERPRET must be set before Triton decorates kernels), and nvcc compile
checks of the CUTLASS sources for sm_80, sm_87 and sm_90a when nvcc and CUTLASS headers exist.
GPU: every path against the reference on fresh random inputs, into NaN-poisoned outputs.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mllm_kernel.cuda.jit import int8_scaled_mm_cutlass as cutlass_mm
from mllm_kernel.jit_utils.target import Target
from pymllm.testing.triton_interpreter import check_in_interpreter


def fake_cutlass(root: Path) -> Path:
    for header in ("cutlass/cutlass.h", "cute/tensor.hpp", "cutlass/version.h"):
        path = root / "include" / header
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#pragma once\n")
    return root


def test_cutlass_home_comes_first(tmp_path, monkeypatch):
    home = fake_cutlass(tmp_path / "home")
    (home / "tools" / "util" / "include").mkdir(parents=True)
    monkeypatch.setenv("CUTLASS_HOME", str(home))
    assert cutlass_mm.find_cutlass_include_dirs() == [home / "include", home / "tools" / "util" / "include"]


def test_bad_cutlass_home_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CUTLASS_HOME", str(tmp_path))
    with pytest.raises(cutlass_mm.CutlassNotFoundError, match="CUTLASS_HOME"):
        cutlass_mm.find_cutlass_include_dirs()


def test_flashinfer_bundle_then_system_then_error(tmp_path, monkeypatch):
    monkeypatch.delenv("CUTLASS_HOME", raising=False)
    package = tmp_path / "flashinfer"
    fake_cutlass(package / "data" / "cutlass")
    spec = SimpleNamespace(submodule_search_locations=[str(package)])
    monkeypatch.setattr(cutlass_mm.importlib.util, "find_spec", lambda name: spec if name == "flashinfer" else None)
    assert cutlass_mm.find_cutlass_include_dirs() == [package / "data" / "cutlass" / "include"]

    system = fake_cutlass(tmp_path / "usr") / "include"
    monkeypatch.setattr(cutlass_mm.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(cutlass_mm, "_SYSTEM_INCLUDE_DIRS", (str(tmp_path / "nowhere"), str(system)))
    assert cutlass_mm.find_cutlass_include_dirs() == [system]

    monkeypatch.setattr(cutlass_mm, "_SYSTEM_INCLUDE_DIRS", ())
    with pytest.raises(cutlass_mm.CutlassNotFoundError, match="CUTLASS headers not found"):
        cutlass_mm.find_cutlass_include_dirs()


def test_build_targets():
    assert cutlass_mm.build_target("sm90", torch.device("cuda", 0)) == Target("cuda", ("9.0a",))
    assert cutlass_mm.variant_for(torch.device("cpu")) is None


def operands(m: int, n: int, k: int, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8).t()  # column-major [K, N]
    scale_a = torch.rand(m, 1, generator=gen) * 1e-3 + 1e-4
    scale_b = torch.rand(n, generator=gen) * 1e-3 + 1e-4
    return a.to(device), b.to(device), scale_a.to(device), scale_b.to(device)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, b, sa, sb: (a.float(), b, sa, sb), "a must be a 2-D int8"),
        (lambda a, b, sa, sb: (a, b.t().contiguous().t().contiguous(), sa, sb), "b must be column-major"),
        (lambda a, b, sa, sb: (a[:, :40], b[:40], sa, sb), "K % 16 == 0"),
        (lambda a, b, sa, sb: (a, b, sa.double(), sb), "scale_a must be contiguous float32"),
        (lambda a, b, sa, sb: (a, b, sa, sb[:-8]), "scale_b must be contiguous float32"),
        (lambda a, b, sa, sb: (a, b[:32], sa, sb), "so b must be \\[K, N\\]"),
    ],
)
def test_argument_checks(change, message):
    a, b, sa, sb = change(*operands(4, 64, 64))
    with pytest.raises((TypeError, ValueError), match=message):
        cutlass_mm.check_arguments(a, b, sa, sb, torch.float16, None)


def test_reference_and_cpu_dispatch():
    from pymllm.quantization.kernels.int8_scaled_mm import int8_scaled_mm

    a, b, sa, sb = operands(5, 48, 96)
    bias = torch.randn(48)
    exact = (a.long() @ b.long()).double() * sa.double() * sb.double() + bias.double()
    assert torch.allclose(cutlass_mm.int8_scaled_mm_reference(a, b, sa, sb, torch.float32, bias).double(), exact,
                          rtol=1e-6, atol=1e-6)
    assert torch.allclose(int8_scaled_mm(a, b, sa, sb, torch.float32, bias).double(), exact, rtol=1e-5, atol=1e-5)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert not actual.isnan().any(), "output has unwritten (NaN) entries"
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def check_small_m(m: int, n: int, k: int, dtype: torch.dtype, device: str, config=None) -> None:
    from pymllm.quantization.kernels.w8a8_triton import int8_scaled_mm_small_m

    a, b, sa, sb = operands(m, n, k, device, seed=m + n)
    bias = torch.randn(n, device=device).to(dtype) if m % 2 else None
    expected = cutlass_mm.int8_scaled_mm_reference(a, b, sa, sb, torch.float64, bias)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    int8_scaled_mm_small_m(a, b, sa, sb, dtype, bias, config=config, out=out)
    assert relative_error(out, expected) < 1e-2, (m, n, k, config)


def check_per_token_quant(m: int, k: int, dtype: torch.dtype, device: str) -> None:
    """Triton kernel and reference both divide correctly rounded: equal bit for bit, and the
    scales equal the float64 quotient rounded to float32."""
    from pymllm.quantization.kernels.int8_activation_triton import (
        per_token_quant_int8_reference,
        per_token_quant_int8_triton,
    )

    x = (torch.randn(m, k, device=device) * 4).to(dtype)
    x[0] = 0  # an all-zero row must not divide by zero
    q, scale = per_token_quant_int8_triton(x)
    q_ref, scale_ref = per_token_quant_int8_reference(x)
    assert torch.equal(scale, scale_ref)
    amax = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-10)
    assert torch.equal(scale, (amax.double() / 127.5).float())
    assert torch.equal(q, q_ref)
    assert q.int().abs().max() <= 128 and torch.all(q[0] == 0)


def interpreter_checks() -> None:
    from pymllm.quantization.kernels.triton_common import SmallMConfig

    for m, k in [(3, 7), (4, 300), (2, 5000), (2, 16500)]:  # one block in registers; two passes past ONE_BLOCK_MAX
        check_per_token_quant(m, k, torch.float16, "cpu")
    for m, n, k in [(1, 96, 256), (3, 64, 512), (16, 80, 128), (33, 40, 64)]:
        check_small_m(m, n, k, torch.float16, "cpu")
        check_small_m(m, n, k, torch.float16, "cpu", SmallMConfig(16 if m <= 16 else 64, 32, 32, 2, True, 4, 2))
    check_small_m(1, 64, 256, torch.float16, "cpu", SmallMConfig(1, 16, 32, 4, False, 4, 2))


def test_triton_kernels_in_interpreter():
    result = check_in_interpreter([__file__], timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.mark.parametrize("variant, archs", [("sm80", ("8.0", "8.7")), ("sm90", ("9.0a",))])
def test_cutlass_sources_compile(variant, archs, tmp_path):
    """nvcc -c of the generated translation unit (no GPU needed); minutes on a small machine."""
    reason = cutlass_mm.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    from mllm_kernel.jit_utils.template import render_template_args

    spec = cutlass_mm.kernel_spec(variant)
    obj = cutlass_mm.build(spec, Target("cuda", archs), render_template_args([torch.bfloat16], "cuda"), tmp_path,
                           output=f"{spec.name}.o")
    assert obj.is_file() and obj.stat().st_size > 0


# ---------------------------------------------------------------- GPU
QWEN3_8B = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]  # (N, K) of qkv, o, gate_up, down
M_VALUES = [1, 7, 16, 17, 64, 65, 128, 2048]


def cutlass_or_skip():
    reason = cutlass_mm.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", M_VALUES)
def test_cutlass_on_gpu(m, dtype):
    cutlass_or_skip()
    variants = [cutlass_mm.int8_scaled_mm]
    if cutlass_mm.variant_for(torch.device("cuda")) == "sm90":
        variants.append(cutlass_mm.int8_scaled_mm_sm80)  # the 2.x build also runs on Hopper
    for n, k in QWEN3_8B if m <= 128 else QWEN3_8B[:2]:
        a, b, sa, sb = operands(m, n, k, "cuda", seed=m * n)
        for bias in (None, torch.randn(n, device="cuda").to(dtype)):
            expected = cutlass_mm.int8_scaled_mm_reference(a, b, sa, sb, torch.float64, bias)
            for gemm in variants:
                out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                gemm(a, b, sa, sb, dtype, bias, out=out)
                assert relative_error(out, expected) < 1e-2, (gemm.__name__, m, n, k, bias is not None)


@pytest.mark.gpu
def test_cutlass_strided_activation_rows():
    """a may be a row slice of a wider buffer (lda > K), as long as rows stay 16-byte aligned."""
    cutlass_or_skip()
    a, b, sa, sb = operands(32, 256, 512, "cuda")
    wide = torch.zeros(32, 640, dtype=torch.int8, device="cuda")
    wide[:, :512] = a
    expected = cutlass_mm.int8_scaled_mm_reference(a, b, sa, sb, torch.float64)
    assert relative_error(cutlass_mm.int8_scaled_mm(wide[:, :512], b, sa, sb, torch.bfloat16), expected) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 7, 16, 33, 64])
def test_triton_small_m_on_gpu(m, dtype):
    for n, k in QWEN3_8B:
        check_small_m(m, n, k, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_per_token_quant_on_gpu(dtype):
    for m, k in [(1, 4096), (7, 12288), (2048, 4096), (3, 100), (2, 20000)]:
        check_per_token_quant(m, k, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("m", M_VALUES)
def test_dispatcher_and_int_mm_fallback_on_gpu(m):
    from pymllm.quantization.kernels.int8_scaled_mm import int8_scaled_mm, int8_scaled_mm_torch

    n, k = 4096, 4096
    a, b, sa, sb = operands(m, n, k, "cuda", seed=m)
    bias = torch.randn(n, device="cuda").bfloat16()
    expected = cutlass_mm.int8_scaled_mm_reference(a, b, sa, sb, torch.float64, bias)
    assert relative_error(int8_scaled_mm(a, b, sa, sb, torch.bfloat16, bias), expected) < 1e-2
    assert relative_error(int8_scaled_mm_torch(a, b, sa, sb, torch.bfloat16, bias), expected) < 1e-2


if __name__ == "__main__":
    interpreter_checks()


def test_gemm_choice_prefers_cutlass_at_every_m():
    from pymllm.quantization.kernels.int8_scaled_mm import choose_int8_gemm

    for m in (1, 7, 16, 64, 2048):
        assert choose_int8_gemm(m, True, True, True, True, True) == "cutlass"
    # Without CUTLASS: the Triton kernel for small M, cuBLASLt int8 beyond, float on the CPU.
    assert choose_int8_gemm(1, True, True, False, True, True) == "triton_small_m"
    assert choose_int8_gemm(2048, True, True, False, False, True) == "int_mm"
    assert choose_int8_gemm(4, True, False, False, False, False) == "float"
    assert choose_int8_gemm(4, False, False, True, True, True) == "float"
    assert choose_int8_gemm(0, True, True, True, True, True) == "float"
