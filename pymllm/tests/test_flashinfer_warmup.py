"""FlashInfer's JIT modules planned while the weights load: what is planned, and when."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pymllm.configs.errors import ConfigError
from pymllm.engine.forward_batch import ForwardMode
from pymllm.layers.attention import flashinfer_warmup, selection
from pymllm.testing.tiny_models import tiny_model_dir
from pymllm.tests.helpers import make_scheduler


class RecordingBackend:
    """Stands in for FlashInferAttnBackend: records the runner it gets and every planned batch."""

    made = []

    def __init__(self, runner):
        self.runner, self.batches = runner, []
        RecordingBackend.made.append(self)

    def init_forward_metadata(self, fb):
        self.batches.append(fb)


def test_plans_the_batches_the_runner_warmup_runs(monkeypatch):
    from pymllm.layers.attention import flashinfer_backend

    monkeypatch.setattr(flashinfer_backend, "FlashInferAttnBackend", RecordingBackend)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    model = make_scheduler(tiny_model_dir("qwen3"), max_total_tokens=64).runner.model
    RecordingBackend.made.clear()
    flashinfer_warmup.plan_like_the_warmup(model, torch.device("cpu"), torch.float32)
    [backend] = RecordingBackend.made
    layer = backend.runner.model.model.layers[0].self_attn
    assert (backend.runner.kv_pool.num_kv_heads, backend.runner.kv_pool.head_dim) == (layer.num_kv_heads, layer.head_dim)
    kinds = [(fb.forward_mode, fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu, fb.seq_lens_cpu) for fb in backend.batches]
    assert kinds == [(ForwardMode.EXTEND, [0], [8], [8]), (ForwardMode.EXTEND, [8], [4], [12]),
                     (ForwardMode.DECODE, None, None, [12])]
    for fb in backend.batches:  # consistent batches: one row, its lengths on the device too
        assert int(fb.seq_lens[0]) == fb.seq_lens_cpu[0] and fb.num_tokens == (fb.extend_seq_lens_cpu or [1])[0]
        assert int(fb.out_cache_loc.max()) <= flashinfer_warmup._POOL_TOKENS


def test_builds_only_where_the_runner_picks_flashinfer(monkeypatch):
    class Runner:
        device, dtype = torch.device("cuda", 0), torch.bfloat16

    monkeypatch.setattr(selection, "flashinfer_available", lambda: True)
    builds = selection.attention_jit_builds("auto", Runner)
    assert [step.name for step in builds(torch.nn.Linear(1, 1))] == ["flashinfer attention modules"]
    assert selection.attention_jit_builds("torch_native", Runner) is None
    Runner.dtype = torch.float32  # FlashInfer has no float32 kernels: auto picks torch_native
    assert selection.attention_jit_builds("auto", Runner) is None
    with pytest.raises(ConfigError, match="float16 or bfloat16"):
        selection.attention_jit_builds("flashinfer", Runner)
    monkeypatch.setattr(selection, "flashinfer_available", lambda: False)
    Runner.dtype = torch.bfloat16
    assert selection.attention_jit_builds("auto", Runner) is None


@pytest.mark.gpu
def test_warmup_planning_runs_and_returns_its_memory():
    if not selection.flashinfer_available():
        pytest.skip("flashinfer not installed")
    device = torch.device("cuda", 0)
    from pymllm.tests.test_gpu_fast_path import TINY  # FlashInfer's SM90 kernels want head_dim 64/128/256

    scheduler = make_scheduler(tiny_model_dir("qwen3", **TINY), max_total_tokens=64, device="cuda", dtype="bfloat16",
                               attention_backend="flashinfer")
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved(device)
    flashinfer_warmup.plan_like_the_warmup(scheduler.runner.model, device, torch.bfloat16)
    from pymllm.layers.attention.flashinfer_backend import WORKSPACE_BYTES

    grown = torch.cuda.memory_reserved(device) - reserved
    assert grown < WORKSPACE_BYTES, f"the warm-up kept {grown >> 20} MiB reserved"
