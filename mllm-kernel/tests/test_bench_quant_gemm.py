"""bench_quant_gemm's selection logic on CPU: which variants --variants keeps and which large-M
tilings --sweep-large times (the timings themselves need a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quant_gemm.py"
    spec = importlib.util.spec_from_file_location("bench_quant_gemm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_flag_keeps_the_named_ones_and_the_baseline(bench):
    assert bench.wanted("w4a16_linear", None) and bench.wanted("int_mm", [])
    only = ["w4a16_dequant_cublas", "w4a16_triton_large_m"]
    assert bench.wanted("w4a16_triton_large_m", only) and bench.wanted("bf16", only)
    assert not bench.wanted("w8a8_gemm_cutlass", only)


def test_sweep_large_splits_k_only_where_tiles_leave_sms_idle(bench):
    sms = 132
    # gate_up at 2,048 rows: every tiling fills the SMs unsplit, so no split is timed.
    configs = bench.large_m_sweep_configs(2048, 24576, 4096, sms)
    assert len(configs) == len(bench.LARGE_M_TILINGS) and {c.split_k for c in configs} == {1}
    # down at 128 rows: 64 x 64 tiles (128 of them) may split 2 ways, 128 x 128 tiles (32) 4 ways.
    configs = bench.large_m_sweep_configs(128, 4096, 12288, sms)
    splits = {(c.block_m, c.block_n, c.block_k): set() for c in configs}
    for c in configs:
        splits[(c.block_m, c.block_n, c.block_k)].add(c.split_k)
    assert splits[(64, 64, 128)] == {1, 2} and splits[(128, 128, 64)] == {1, 2, 4}
    # A K that a split does not divide stays whole; tiles deeper than K are not timed at all.
    configs = bench.large_m_sweep_configs(128, 4096, 192, sms)
    assert {c.split_k for c in configs} == {1} and {c.block_k for c in configs} == {64}


def test_main_refuses_without_cuda(bench, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert bench.main(["--m", "128", "--variants", "w4a16_triton_large_m", "--sweep-large"]) == 1
    assert "needs a CUDA device" in capsys.readouterr().err
