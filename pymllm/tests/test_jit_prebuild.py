"""The model's JIT builds, listed per weight kind and joined before the post-load self-tests."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import AutoConfig

from pymllm.configs.model_config import ModelConfig
from pymllm.layers.kernels import jit_prebuild
from pymllm.model_loader import loader
from pymllm.models.qwen3 import Qwen3ForCausalLM
from pymllm.tests.test_compressed_tensors_config import W4A16, W8A8, with_group
from pymllm.tests.test_compressed_tensors_runtime import base_checkpoint, config_for

CUDA = torch.device("cuda", 0)
BF16 = "__nv_bfloat16"
ALWAYS = {f"gemv<{BF16}>", f"store_cache<{BF16}, int64_t>", "create_kv_indices<int64_t, int32_t>"}


def build_names(raw, monkeypatch, cutlass: bool = True):
    """Names of the builds a tiny Qwen3 (built on the CPU) would start on an SM90 device."""
    monkeypatch.setattr(jit_prebuild, "decode_kernels_run_on", lambda device, dtype: device.type == "cuda")
    monkeypatch.setattr("pymllm.quantization.kernels.int8_scaled_mm.cutlass_unavailable_reason",
                        lambda: None if cutlass else "no CUTLASS headers")
    monkeypatch.setattr("mllm_kernel.cuda.jit.int8_scaled_mm_cutlass.variant_for", lambda device: "sm90")
    monkeypatch.setattr("pymllm.quantization.kernels.int8_scaled_mm.cuda_capability", lambda device: (9, 0))
    # By module: the package's w4a16_gemm attribute is the function.
    monkeypatch.setattr(importlib.import_module("mllm_kernel.cuda.jit.w4a16_gemm"), "wgmma_available",
                        lambda device: device.type == "cuda")
    hf_config = AutoConfig.from_pretrained(base_checkpoint())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen3ForCausalLM(hf_config, quant_config=None if raw is None else config_for(raw))
    finally:
        torch.set_default_dtype(previous)
    return {step.name for step in jit_prebuild.model_builds(model, CUDA, torch.bfloat16)}


def test_bf16_model_builds_the_dense_gemv_family(monkeypatch):
    assert build_names(None, monkeypatch) == ALWAYS | {
        f"gemv_prologue<{BF16}, 1>", f"gemv_prologue<{BF16}, 2>", f"gemv_gated_silu<{BF16}>"}


def test_w8a8_model_builds_its_gemvs_and_the_cutlass_gemm(monkeypatch):
    w8a8 = {f"gemv_w8a8<{BF16}>"} | {f"gemv_w8a8_dynamic<{BF16}, {p}>" for p in (0, 1, 2)}
    assert build_names(W8A8, monkeypatch) == ALWAYS | w8a8 | {"int8_scaled_mm_sm90<bfloat16>"}
    assert build_names(W8A8, monkeypatch, cutlass=False) == ALWAYS | w8a8


@pytest.mark.parametrize("symmetric", [True, False])
def test_w4a16_model_builds_plain_and_gated_gemvs_and_the_gemms(monkeypatch, symmetric):
    raw = with_group(W4A16, weights__symmetric=symmetric)
    zeros = "false" if symmetric else "true"
    assert build_names(raw, monkeypatch) == ALWAYS | {
        f"w4a16_gemv<{BF16}, {zeros}, false>", f"w4a16_gemv<{BF16}, {zeros}, true>", f"w4a16_gemm<{BF16}, {zeros}>",
        f"w4a16_gemm_sm90<{BF16}, {zeros}>"}


def test_nothing_to_build_on_the_cpu():
    model = torch.nn.Linear(2, 2)
    assert not isinstance(jit_prebuild.start_kernel_builds(model, torch.device("cpu"), torch.float32),
                          jit_prebuild.KernelBuilds)
    assert jit_prebuild.gemv_builds(("dense",), torch.device("cpu"), torch.bfloat16) == []
    assert jit_prebuild.kv_cache_builds(torch.device("cpu"), torch.bfloat16) == []


def test_unknown_gemv_kind_is_an_error():
    from mllm_kernel.cuda.jit import gemv_kernels

    with pytest.raises(ValueError, match="unknown GEMV build kind"):
        gemv_kernels.build_steps("w3a3", torch.bfloat16, CUDA)


def test_background_builds_run_and_report_failures():
    from mllm_kernel.jit_utils import BuildStep

    ran = []

    def broken():
        raise RuntimeError("no nvcc")

    with jit_prebuild.KernelBuilds([BuildStep("a", lambda: ran.append("a")), BuildStep("b", broken)]) as builds:
        pass
    builds.wait()  # joined by the block already; idempotent
    assert ran == ["a"] and list(builds.failures) == ["b"]


def test_a_failed_load_stops_the_builds_not_yet_started(monkeypatch):
    """An exception in the block (a bad checkpoint, Ctrl-C) must not leave the process waiting
    for every queued compile: the steps not started are skipped."""
    import threading

    from mllm_kernel.jit_utils import BuildStep

    monkeypatch.setenv("MLLM_KERNEL_JIT_JOBS", "1")
    started, release, ran = threading.Event(), threading.Event(), []

    def first():
        started.set()
        release.wait(30)
        ran.append("first")

    steps = [BuildStep("first", first), BuildStep("second", lambda: ran.append("second"))]
    with pytest.raises(RuntimeError, match="checkpoint"):
        with jit_prebuild.KernelBuilds(steps) as builds:
            started.wait(30)
            raise RuntimeError("bad checkpoint")
    release.set()
    builds._thread.join(30)
    assert ran == ["first"] and builds.failures == {}


def test_a_bad_job_count_fails_on_the_loading_thread(monkeypatch):
    from mllm_kernel.jit_utils import BuildStep

    monkeypatch.setenv("MLLM_KERNEL_JIT_JOBS", "lots")
    with pytest.raises(ValueError, match="MLLM_KERNEL_JIT_JOBS"):
        jit_prebuild.KernelBuilds([BuildStep("a", lambda: None)])


def test_loader_joins_the_builds_before_the_post_load_conversion(monkeypatch):
    events = []

    class FakeBuilds:
        def __enter__(self):
            events.append("start")

        def __exit__(self, *exc):
            events.append("join")

    def start(model, device, dtype, extra):
        events.append(extra(model))
        return FakeBuilds()

    monkeypatch.setattr(loader, "start_kernel_builds", start)
    from pymllm.layers.linear import UnquantizedLinearMethod

    monkeypatch.setattr(UnquantizedLinearMethod, "process_weights_after_loading",
                        lambda self, layer: events.append("convert"))
    path = str(base_checkpoint())
    model_config = ModelConfig(model_path=path, tokenizer_path=path, hf_config=AutoConfig.from_pretrained(path),
                               dtype=torch.float32, context_length=128)
    loader.load_model(model_config, "dummy", torch.device("cpu"), extra_builds=lambda model: "extra steps")
    assert events[:3] == ["extra steps", "start", "join"] and events[3:] and set(events[3:]) == {"convert"}
