"""python -m mllm_kernel show-env / show-config."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm_kernel.__main__ import main


def test_show_env(capsys: pytest.CaptureFixture[str]) -> None:
    main(["show-env"])
    output = capsys.readouterr().out
    for field in ("python", "torch", "tvm_ffi", "nvcc", "cuda available", "cache dir"):
        assert field in output


def test_show_config_lists_kernels(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MLLM_KERNEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MLLM_KERNEL_CUDA_ARCH_LIST", "9.0")
    main(["show-config"])
    output = capsys.readouterr().out
    assert f"cache dir: {tmp_path}" in output
    for line in ("store_cache", "create_kv_indices"):
        assert line in output
    assert "sm_90" in output and "not cached" in output
