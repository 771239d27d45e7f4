"""scripts/profile_decode.py's critical-path attribution, on made-up kernel timelines, and its
kernel labels (CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "profile_decode.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("profile_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def critical_path(script):
    return script.critical_path


def test_serial_kernels_are_charged_their_durations(critical_path) -> None:
    rows = critical_path([("gemv", 0.0, 5.0), ("norm", 5.0, 6.5), ("gemv", 6.5, 11.5)])
    assert rows == [("gemv", 2, 10.0), ("norm", 1, 1.5)]


def test_overlapped_work_costs_only_what_extends_the_step(critical_path) -> None:
    # PDL: the attention starts while the GEMV runs and ends 3 us after it; a kernel hidden
    # inside another costs nothing. The charges add up to the step's span.
    kernels = [("attn", 4.0, 8.0), ("gemv", 0.0, 5.0), ("tiny", 1.0, 2.0), ("o", 7.0, 12.0)]
    rows = critical_path(kernels)
    assert dict((name, us) for name, _, us in rows) == {"gemv": 5.0, "attn": 3.0, "o": 4.0, "tiny": 0.0}
    assert sum(us for _, _, us in rows) == 12.0


def test_empty_step(critical_path) -> None:
    assert critical_path([]) == []


def test_labels_keep_the_template_arguments_apart(script) -> None:
    prefix = "mllm_kernel::w4a16_gemv_detail::w4a16_gemv_one_row_kernel<__nv_bfloat16, false, "
    plain = f"void {prefix}false, 16>(mllm_kernel::w4a16_gemv_detail::Params)"
    gated = f"void {prefix}true, 8>(mllm_kernel::w4a16_gemv_detail::Params)"
    assert script.kernel_label(plain) == prefix + "false, 16>"
    assert script.kernel_label(gated) == prefix + "true, 8>"
    assert script.kernel_label("_rms_norm_kernel") == "_rms_norm_kernel"
    assert script.kernel_label("x" * 120, width=10) == "xxxxxxx..."
