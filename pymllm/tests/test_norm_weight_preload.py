"""The RMSNorm kernels read their weight before the PDL wait (norm_act_triton.enter_with_norm_weight).

At one row an RMSNorm kernel's time is its chain of memory round trips; a weight load after the
sum of squares' block barrier would be a second round trip (the compiler does not move loads
across a barrier). Checked on the PTX Triton generates for SM90, which needs no GPU: global loads
sit between ``griddepcontrol.launch_dependents`` and ``griddepcontrol.wait``, and none follows
the first barrier. The numbers the kernels compute are tested elsewhere (test_fused_ops,
test_quantizing_prologues)."""

from __future__ import annotations

from typing import List

import pytest

triton = pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _fp_fusion_as_the_kernels_run(monkeypatch):
    # Triton's default (fusion on), stated, so that newer Triton does not warn about it being unset.
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")


ROW_ARGS = {"x_stride": "i32", "res_stride": "i32", "res_out_stride": "i32", "n_cols": "i32", "eps": "fp32"}


def _ptx(kernel, signature: dict, constexprs: dict) -> List[str]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=kernel, signature={**signature, **{name: "constexpr" for name in constexprs}},
                       constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})
    return [line.strip() for line in compiled.asm["ptx"].splitlines()]


def _assert_weight_loaded_before_the_wait(ptx: List[str]) -> None:
    def first(text: str) -> int:
        return next(i for i, line in enumerate(ptx) if text in line)

    launch, wait, barrier = first("griddepcontrol.launch_dependents"), first("griddepcontrol.wait"), first("bar.sync")
    loads = [i for i, line in enumerate(ptx) if "ld.global" in line]
    assert launch < wait < barrier
    assert any(launch < i < wait for i in loads), "no load before the wait"
    assert not any(i > barrier for i in loads), "a global load after the reduction's barrier"


@pytest.mark.parametrize("has_residual", [False, True])
def test_rms_norm_kernel_loads_its_weight_before_the_wait(has_residual) -> None:
    from pymllm.layers.kernels.norm_act_triton import _rms_norm_kernel

    signature = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_out_ptr": "*bf16",
                 "out_stride": "i32", **ROW_ARGS}
    ptx = _ptx(_rms_norm_kernel, signature, {"HAS_RESIDUAL": has_residual, "BLOCK": 4096, "USE_PDL": True})
    _assert_weight_loaded_before_the_wait(ptx)


def test_rms_norm_quant_kernel_loads_its_weight_before_the_wait() -> None:
    from pymllm.quantization.kernels.int8_activation_triton import _rms_norm_quant_int8_kernel

    signature = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "q_ptr": "*i8", "scale_ptr": "*fp32",
                 "res_out_ptr": "*bf16", "q_stride": "i32", **ROW_ARGS}
    ptx = _ptx(_rms_norm_quant_int8_kernel, signature, {"HAS_RESIDUAL": True, "BLOCK": 4096, "USE_PDL": True})
    _assert_weight_loaded_before_the_wait(ptx)
