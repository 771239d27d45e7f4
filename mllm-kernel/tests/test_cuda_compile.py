"""Compile-check every CUDA kernel with nvcc for sm_80, sm_87 and sm_90 (no GPU needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tvm_ffi.libinfo import find_dlpack_include_path, find_include_path

import mllm_kernel  # noqa: F401  (registers the kernels)
from mllm_kernel.jit_utils import compiler, registered_kernels
from mllm_kernel.jit_utils.template import render_template_args

ARCHS = ("80", "87", "90")

# Template instances to compile per kernel; every kernel with CUDA sources must be listed.
INSTANCES = {
    "store_cache": [(torch.bfloat16, torch.int64), (torch.float16, torch.int32), (torch.float32, torch.int64)],
    "create_kv_indices": [(torch.int64, torch.int32), (torch.int32, torch.int64)],
    "gemv": [(torch.bfloat16,)],
    "gemv_w8a8": [(torch.float16,)],
    "gemv_gated_silu": [(torch.bfloat16,)],
    # Every prologue (1 rmsnorm, 2 silu_mul; 0 none for the int8 entry) with each format, each
    # in one dtype (the dtype only changes the element type, not the code paths).
    "gemv_prologue": [(torch.bfloat16, 1), (torch.float16, 2)],
    "gemv_w8a8_dynamic": [(torch.float16, 0), (torch.bfloat16, 1), (torch.float16, 2)],
    "w4a16_gemv": [(torch.bfloat16, False, False), (torch.float16, True, False), (torch.bfloat16, True, True)],
    "w4a16_gemm": [(torch.bfloat16, False), (torch.float16, True)],
    # Compiles to an empty body below sm_90a (the host refuses those GPUs); see test_wgmma_kernels_for_sm90a.
    "w4a16_gemm_sm90": [(torch.bfloat16, False), (torch.float16, True)],
}
# Kernels built for an arch-specific target (wgmma), compiled for it on their own.
ARCH_SPECIFIC = {"w4a16_gemm_sm90": "90a"}


def nvcc_command(source: Path, output: Path, archs, *extra: str) -> list:
    return [
        "nvcc",
        *compiler.CUDA_FLAGS,
        "-Xcompiler",
        "-fPIC",
        *(f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs),
        "--threads=0",  # compile the archs in parallel
        *extra,
        f"-I{find_include_path()}",
        f"-I{find_dlpack_include_path()}",
        *(f"-I{path}" for path in compiler.include_dirs("cuda")),
        "-c",
        str(source),
        "-o",
        str(output),
    ]


def translation_unit(specs, instances) -> str:
    lines = ["#include <tvm/ffi/function.h>"]
    lines += [f'#include "{path}"' for spec in specs for path in spec.sources_for("cuda")]
    for spec in specs:
        for index, template_args in enumerate(instances[spec.name]):
            rendered = render_template_args(template_args, "cuda")
            lines.append(compiler.export_statement(spec, rendered, f"{spec.name}_{index}"))
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_wgmma_kernels_for_sm90a(tmp_path: Path) -> None:
    """The sm_90a kernels compile for sm_90a without spills, and ptxas keeps their wgmma
    asynchronous (it warns when it has to serialize them, e.g. for registers still in flight)."""
    for name, arch in ARCH_SPECIFIC.items():
        spec = next(spec for spec in registered_kernels() if spec.name == name)
        source = tmp_path / f"{name}.cu"
        source.write_text(translation_unit([spec], INSTANCES))
        command = nvcc_command(source, tmp_path / f"{name}.o", (arch,), "-Xptxas", "-v")
        result = subprocess.run(command, capture_output=True, text=True)
        log = result.stdout + result.stderr
        assert result.returncode == 0, f"{' '.join(command)}\n{log}"
        # Every kernel ptxas compiled for the arch reports its spills, so the check below covers each.
        entries = re.findall(rf"Compiling entry function '\S+' for 'sm_{arch}'", log)
        spill_lines = [line for line in log.splitlines() if "spill" in line]
        assert entries and len(spill_lines) == len(entries), log
        assert "serialized" not in log and "arning" not in log, log
        assert all(line.strip().startswith("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
                   for line in spill_lines), log


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_sources_compile(tmp_path: Path) -> None:
    specs = [spec for spec in registered_kernels() if "cuda" in spec.devices]
    assert {spec.name for spec in specs} == set(INSTANCES), "list the new kernel's instances in INSTANCES"

    # One translation unit for all kernels: nvcc parses the TVM-FFI headers once per arch, not once per kernel.
    source = tmp_path / "all_kernels.cu"
    source.write_text(translation_unit(specs, INSTANCES))
    command = nvcc_command(source, tmp_path / "all_kernels.o", ARCHS)
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
