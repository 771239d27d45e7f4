"""Programmatic dependent launch on pymllm's side (CPU): the launch options the Triton decode
kernels get and --server.disable_pdl reaching mllm_kernel's switch through the ModelRunner. The
kernels with the USE_PDL constexpr off run under the interpreter in test_fused_ops and
test_triton_decode; the GPU side is test_gpu_fast_path's PDL on/off model comparison and
mllm-kernel's test_pdl chain."""

from __future__ import annotations

import logging

import pytest
import torch

from mllm_kernel import pdl as kernel_pdl
from pymllm.configs import GlobalConfig, parse_config
from pymllm.executor.model_runner import load_model_runner
from pymllm.layers.kernels import pdl
from pymllm.testing.tiny_models import tiny_model_dir


@pytest.fixture
def restore_switch():
    enabled = kernel_pdl.is_enabled()
    yield
    kernel_pdl.set_enabled(enabled)


def test_flag_parses():
    assert parse_config(["--server.disable_pdl"]).server.disable_pdl is True
    assert parse_config([]).server.disable_pdl is False


def test_cpu_launches_are_plain(restore_switch):
    kernel_pdl.set_enabled(True)
    assert pdl.launch_options(torch.device("cpu"), 1) == {"USE_PDL": False}


@pytest.mark.parametrize("kernel_says, triton_has_ops, expected", [
    (True, True, {"USE_PDL": True, "launch_pdl": True}),
    (True, False, {"USE_PDL": False}),  # an old Triton: the CUDA kernels alone use PDL
    (False, True, {"USE_PDL": False}),  # SM80/SM87 or switched off
])
def test_launch_options_follow_policy_and_triton(monkeypatch, kernel_says, triton_has_ops, expected):
    monkeypatch.setattr(kernel_pdl, "use_pdl", lambda device: kernel_says)
    monkeypatch.setattr(pdl, "triton_supports_pdl", lambda: triton_has_ops)
    assert pdl.launch_options(torch.device("cuda", 0), 1) == expected


def test_prefill_sized_launches_are_plain(monkeypatch):
    monkeypatch.setattr(kernel_pdl, "use_pdl", lambda device: True)
    monkeypatch.setattr(pdl, "triton_supports_pdl", lambda: True)
    cuda = torch.device("cuda", 0)
    assert pdl.launch_options(cuda, pdl.PDL_MAX_ROWS)["USE_PDL"] is True
    assert pdl.launch_options(cuda, pdl.PDL_MAX_ROWS + 1) == {"USE_PDL": False}


def test_configure_sets_the_switch_and_logs(monkeypatch, restore_switch, caplog):
    monkeypatch.setattr(kernel_pdl, "_capable", {0: True})
    monkeypatch.setattr(pdl, "triton_supports_pdl", lambda: True)
    with caplog.at_level(logging.INFO, logger=pdl.__name__):
        assert pdl.configure(disabled=False, device=torch.device("cuda", 0)) is True
        assert kernel_pdl.is_enabled()
        assert pdl.configure(disabled=True, device=torch.device("cuda", 0)) is False
        assert not kernel_pdl.is_enabled()
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].endswith(": on") and messages[1].endswith("off (--server.disable_pdl)")
    monkeypatch.setattr(kernel_pdl, "_capable", {0: False})
    with caplog.at_level(logging.INFO, logger=pdl.__name__):
        pdl.configure(disabled=False, device=torch.device("cuda", 0))
    assert "needs compute capability 9.0+" in caplog.records[-1].getMessage()


def test_environment_switch_survives_the_runner(monkeypatch, restore_switch, caplog):
    monkeypatch.setattr(kernel_pdl, "_capable", {0: True})
    monkeypatch.setenv(kernel_pdl.DISABLE_ENV, "1")
    with caplog.at_level(logging.INFO, logger=pdl.__name__):
        assert pdl.configure(disabled=False, device=torch.device("cuda", 0)) is False
    assert not kernel_pdl.is_enabled()
    assert caplog.records[-1].getMessage().endswith(f"off ({kernel_pdl.DISABLE_ENV})")


def test_model_runner_applies_the_flag(restore_switch, monkeypatch):
    monkeypatch.delenv(kernel_pdl.DISABLE_ENV, raising=False)
    config = GlobalConfig()
    config.server.model_path = str(tiny_model_dir("qwen3"))
    config.server.device = "cpu"
    config.server.disable_pdl = True
    config.validate()
    load_model_runner(config)
    assert kernel_pdl.is_enabled() is False
    config.server.disable_pdl = False
    load_model_runner(config)
    assert kernel_pdl.is_enabled() is True
