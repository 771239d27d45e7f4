"""scripts/ab_rope_attention_launch.py: the A/B wrapper behind the one-row attention launch rows."""

from __future__ import annotations

import importlib.util
import pathlib
import runpy
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "ab_rope_attention_launch.py"


def _load():
    spec = importlib.util.spec_from_file_location("ab_rope_attention_launch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_it_overrides_the_launch_and_runs_bench_one_batch(monkeypatch) -> None:
    from pymllm.layers.attention import triton_decode as td

    seen = {}
    monkeypatch.setattr(td, "decode_attention", lambda *a, **kw: seen.setdefault("kwargs", kw))
    monkeypatch.setattr(td, "num_splits_for", td.num_splits_for)
    monkeypatch.setattr(runpy, "run_module", lambda name, run_name: seen.update(module=name, argv=list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["ab", "8", "2", "32", "32", "--", "--batch-size", "1"])
    _load().main()
    assert seen["module"] == "pymllm.bench_one_batch" and seen["argv"][1:] == ["--batch-size", "1"]
    td.decode_attention("q", num_warps=4)  # the backend's own settings are overridden
    assert seen["kwargs"] == {"num_warps": 8, "num_stages": 2, "block": 32}
    assert td.num_splits_for(1, 8, 132) == 32


def test_bad_arguments_print_the_usage(monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["ab", "8", "2"])
    with pytest.raises(SystemExit, match="WARPS STAGES SPLITS BLOCK"):
        _load().main()
