"""check_in_interpreter: a failing interpreter check is skipped only when the interpreter itself
fails the probe (an environment that cannot run our kernels), and never in CI."""

from __future__ import annotations

import pytest

from pymllm.testing import triton_interpreter

pytest.importorskip("triton")

FAILING = ["-c", "raise SystemExit(3)"]


def test_the_probe_reports_the_interpreters_error(monkeypatch):
    import subprocess

    failed = subprocess.CompletedProcess([], 1, "", "Traceback ...\nInterpreterError: TypeError('boom')\n")
    monkeypatch.setattr(triton_interpreter, "run_in_interpreter", lambda argv, timeout: failed)
    reason = triton_interpreter.interpreter_unusable_reason.__wrapped__()
    assert "interpreter cannot run a loop over a run-time bound" in reason and reason.endswith("TypeError('boom')")
    passed = subprocess.CompletedProcess([], 0, "", "")
    monkeypatch.setattr(triton_interpreter, "run_in_interpreter", lambda argv, timeout: passed)
    assert triton_interpreter.interpreter_unusable_reason.__wrapped__() is None


def test_a_failing_check_is_reported_where_the_interpreter_works(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(triton_interpreter, "interpreter_unusable_reason", lambda: None)
    assert triton_interpreter.check_in_interpreter(FAILING).returncode == 3


def test_a_failing_check_is_skipped_where_the_interpreter_fails_the_probe(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(triton_interpreter, "interpreter_unusable_reason", lambda: "old interpreter")
    with pytest.raises(pytest.skip.Exception, match="old interpreter"):
        triton_interpreter.check_in_interpreter(FAILING)


def test_ci_never_skips(monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(triton_interpreter, "interpreter_unusable_reason", lambda: "old interpreter")
    assert triton_interpreter.check_in_interpreter(FAILING).returncode == 3


def test_a_passing_check_never_asks_the_probe(monkeypatch):
    def probe():
        raise AssertionError("the probe runs only after a failure")

    monkeypatch.setattr(triton_interpreter, "interpreter_unusable_reason", probe)
    assert triton_interpreter.check_in_interpreter(["-c", "import os; assert os.environ['TRITON_INTERPRET'] == '1'"]).returncode == 0
