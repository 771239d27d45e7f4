"""The A/B wrappers in scripts/ behind rows of docs/perf (they patch one decision and run bench_one_batch)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import pytest
import torch

from pymllm import bench_one_batch

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
    monkeypatch.setattr(bench_one_batch, "main", lambda argv: seen.update(argv=list(argv)) or 0)
    monkeypatch.setattr(sys, "argv", ["ab", "8", "2", "32", "32", "--", "--batch-size", "1"])
    with pytest.raises(SystemExit) as done:
        _load().main()
    assert done.value.code == 0 and seen["argv"] == ["--batch-size", "1"]  # bench_one_batch gets the rest
    td.decode_attention("q", num_warps=4)  # the backend's own settings are overridden
    assert seen["kwargs"] == {"num_warps": 8, "num_stages": 2, "block": 32}
    assert td.num_splits_for(1, 8, 132) == 32


def test_bad_arguments_print_the_usage(monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["ab", "8", "2"])
    with pytest.raises(SystemExit, match="WARPS STAGES SPLITS BLOCK"):
        _load().main()


def test_forced_fused_gemv_decisions(monkeypatch) -> None:
    """scripts/ab_fused_gemv_decisions.py: the forced modes, and measured decisions kept for other kinds."""
    from pymllm.layers.kernels import fused_gemv

    spec = importlib.util.spec_from_file_location("ab_fused", SCRIPT.parent / "ab_fused_gemv_decisions.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    assert [ab.forced_decision("all", p) for p in ("none", "rmsnorm", "silu_mul")] == [True, True, True]
    assert [ab.forced_decision("none", p) for p in ("none", "rmsnorm", "silu_mul")] == [True, False, False]
    assert [ab.forced_decision("prologues", p) for p in ("none", "rmsnorm", "silu_mul")] == [False, True, True]
    assert [ab.forced_decision("separate", p) for p in ("none", "rmsnorm", "silu_mul")] == [False, False, False]
    monkeypatch.setattr(fused_gemv, "_fused_wins", lambda *args: "measured")
    monkeypatch.setattr(bench_one_batch, "main", lambda argv: 0)
    monkeypatch.setattr(sys, "argv", ["ab", "w8a8", "prologues", "--", "--batch-size", "1"])
    with pytest.raises(SystemExit):
        ab.main()
    assert fused_gemv._fused_wins("rmsnorm", "w8a8", None, None, None, None) is True
    assert fused_gemv._fused_wins("none", "w8a8", None, None, None, None) is False
    assert fused_gemv._fused_wins("rmsnorm", "dense", None, None, None, None) == "measured"
    monkeypatch.setattr(sys, "argv", ["ab", "w8a8", "sometimes", "--"])
    with pytest.raises(SystemExit, match="KIND MODE"):
        ab.main()


def test_forced_w4a16_one_row_kernel(monkeypatch) -> None:
    """scripts/ab_w4a16_one_row.py: each mode's arguments reach every w4a16_gemv call; explicit ones stay."""
    gemv = importlib.import_module("mllm_kernel.cuda.jit.w4a16_gemv")
    spec = importlib.util.spec_from_file_location("ab_one_row", SCRIPT.parent / "ab_w4a16_one_row.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    assert ab.forced_arguments("planned", {"gated": True}) == {"gated": True}
    assert ab.forced_arguments("registers", {}) == {"one_row_warps": 0}
    assert ab.forced_arguments("late", {}) == {"early_weights": False}
    assert ab.forced_arguments("registers", {"one_row_warps": 8}) == {"one_row_warps": 8}
    assert ab.forced_arguments("early_dependents", {}) == {"early_dependents": True}
    assert ab.forced_arguments("late_dependents", {}) == {"early_dependents": False}
    assert ab.forced_arguments("unsplit", {}) == {"splits": 1}
    seen = []

    def planned(*args, **kwargs):
        seen.append(kwargs)

    planned.kernel = "jit handle"
    monkeypatch.setattr(gemv, "w4a16_gemv", planned)
    monkeypatch.setattr(bench_one_batch, "main", lambda argv: seen.append(list(argv)) or 0)
    monkeypatch.setattr(sys, "argv", ["ab", "registers", "--", "--batch-size", "1"])
    with pytest.raises(SystemExit) as done:
        ab.main()
    assert done.value.code == 0 and seen == [["--batch-size", "1"]]
    gemv.w4a16_gemv("x", gated=True)  # what pymllm's W4A16 layers call
    assert seen[-1] == {"gated": True, "one_row_warps": 0}
    assert gemv.w4a16_gemv.kernel == "jit handle"  # build_step still finds the kernel
    monkeypatch.setattr(sys, "argv", ["ab", "sometimes", "--"])
    with pytest.raises(SystemExit, match="MODE"):
        ab.main()


def test_forced_plans(monkeypatch) -> None:
    """scripts/ab_forced_plans.py: forced one-row GEMV tilings and W4A16 plans; the rest measured."""
    from pymllm.layers.kernels import gemv_dispatch as gd

    plans = importlib.import_module("mllm_kernel.cuda.jit.w4a16_gemv")
    spec = importlib.util.spec_from_file_location("ab_forced", SCRIPT.parent / "ab_forced_plans.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    gemv, one_row, rest = ab.parse(["--gemv", "w8a8:6144:4096:4", "--w4a16", "4096:4096:16:1", "--w4a16",
                                    "4096:12288:16:1:32", "--", "--batch-size", "1"])
    assert gemv == {("w8a8", 6144, 4096): 4} and rest == ["--batch-size", "1"]
    assert one_row == {(4096, 4096): (16, 1, 64), (4096, 12288): (16, 1, 32)}
    for bad in (["--gemv", "w8a8:6144:4"], ["--w4a16", "a:b:c:d"], ["--w4a16", "1:2:3:4:5:6"], ["--gemv"],
                ["--tiles", "1:2:3:4"]):
        with pytest.raises(SystemExit, match="ab_forced_plans"):
            ab.parse(bad + ["--"])
    with pytest.raises(SystemExit, match="ab_forced_plans"):
        ab.parse(["--gemv", "w8a8:6144:4096:4"])  # no "--"

    monkeypatch.setattr(gd.GemvChooser, "use_gemv", gd.GemvChooser.use_gemv)
    monkeypatch.setattr(plans, "plan_one_row", plans.plan_one_row)
    seen = []
    monkeypatch.setattr(bench_one_batch, "main", lambda argv: seen.append(list(argv)) or 0)
    monkeypatch.setattr(ab.atexit, "register", lambda fn: seen.append(fn.__name__))  # the report at exit
    monkeypatch.setattr(sys, "argv", ["ab", "--gemv", "w8a8:6144:4096:4", "--w4a16", "4096:4096:16:1", "--", "-x"])
    with pytest.raises(SystemExit) as done:
        ab.main()
    assert done.value.code == 0 and seen == ["report_decisions", ["-x"]]
    chooser = gd.GemvChooser(timer=lambda impl, calls: {"gemm": 1.0}.get(impl, 2.0))  # the GEMM measures faster
    weight = torch.zeros(8, 16)

    def key(n, rows=1):
        return ("w8a8", torch.device("cpu"), torch.bfloat16, n, 4096, rows)

    assert chooser.use_gemv(key(6144), weight, lambda impl, w: lambda: None, tilings=(1, 2, 4)) is True
    assert chooser.tiling(key(6144)) == 4  # forced at one row
    assert chooser.use_gemv(key(6144, rows=2), weight, lambda impl, w: lambda: None, tilings=(1, 2, 4)) is False
    assert chooser.use_gemv(key(4096), weight, lambda impl, w: lambda: None, tilings=(1, 2, 4)) is False
    assert plans.plan_one_row(4096, 4096, 132, 4814.3) == (16, 1, 64)  # forced (the plan says narrow tiles)
    assert plans.plan_one_row(4096, 12288, 132, 4814.3) == (16, 1, 32)  # planned


def _ab_trees():
    spec = importlib.util.spec_from_file_location("ab_trees", SCRIPT.parent / "ab_trees.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ab_trees_prepare_writes_a_revision_of_the_trees(tmp_path) -> None:
    """scripts/ab_trees.py prepare: a revision's pymllm, mllm-kernel and benchmarks, nothing else."""
    import subprocess

    repo = tmp_path / "repo"
    for part in ("pymllm/a.py", "mllm-kernel/b.py", "benchmarks/c.json", "docs/d.md"):
        (repo / part).parent.mkdir(parents=True, exist_ok=True)
        (repo / part).write_text("first\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "first"], check=True)
    (repo / "pymllm/a.py").write_text("second\n")  # uncommitted: not part of HEAD
    _ab_trees().prepare("HEAD", tmp_path / "base", repo)
    base = tmp_path / "base"
    assert (base / "pymllm/a.py").read_text() == "first\n" and (base / "mllm-kernel/b.py").is_file()
    assert (base / "benchmarks/c.json").is_file() and not (base / "docs").exists()


def test_ab_trees_run_alternates_the_trees_and_compares_their_steps(tmp_path, monkeypatch, capsys) -> None:
    import json
    import subprocess

    ab = _ab_trees()
    base = tmp_path / "base"
    (base / "pymllm").mkdir(parents=True)
    result = tmp_path / "rows.jsonl"
    result.write_text(json.dumps({"run_name": "older", "batch_size": 1, "median_decode_latency": 9.0}) + "\n")
    steps = {"ours": 0.002, "base": 0.004}
    calls = []

    def fake_run(argv, cwd, env, timeout):
        name = argv[argv.index("--run-name") + 1]
        assert argv[argv.index("--result-filename") + 1] == str(result)
        calls.append((name, pathlib.Path(cwd), env["PYTHONPATH"].split(os.pathsep)[:2], argv[3:5], timeout))
        with open(result, "a") as f:
            for size in (1, 8):
                graph = steps[name.split("-")[0]] * size
                f.write(json.dumps({"run_name": name, "batch_size": size, "median_decode_latency": 1.0,
                                    "decode_graph_latency": graph}) + "\n")
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(ab.subprocess, "run", fake_run)
    assert ab.main(["run", "--baseline", str(base), "--rounds", "2", "--result-file", str(result),
                    "--timeout", "30", "--", "--batch-size", "1", "8"]) == 0
    root = ab.ROOT
    assert [c[0] for c in calls] == ["ours-1", "base-1", "ours-2", "base-2"]
    assert calls[0][1:] == (root, [str(root), str(root / "mllm-kernel")], ["--batch-size", "1"], 30.0)
    assert calls[1][1:3] == (base.resolve(), [str(base.resolve()), str(base.resolve() / "mllm-kernel")])
    out = capsys.readouterr().out
    # Graph times (the older row of the file is not this run's), ours / base of the medians.
    assert "batch 1:  ours 2.000 / 2.000 ms  base 4.000 / 4.000 ms  ours / base 0.500" in out
    assert "batch 8:  ours 16.000 / 16.000 ms  base 32.000 / 32.000 ms  ours / base 0.500" in out


def test_ab_trees_refuses_what_it_sets_itself(tmp_path) -> None:
    ab = _ab_trees()
    (tmp_path / "pymllm").mkdir()
    with pytest.raises(SystemExit, match="names the runs"):
        ab.main(["run", "--baseline", str(tmp_path), "--", "--run-name", "x"])
    with pytest.raises(SystemExit, match="no pymllm"):
        ab.main(["run", "--baseline", str(tmp_path / "missing"), "--", "--batch-size", "1"])
    with pytest.raises(SystemExit, match="at least 1"):
        ab.main(["run", "--baseline", str(tmp_path), "--rounds", "0"])
    # Eager rows (no graph) are compared by their median step.
    assert ab.decode_ms({"median_decode_latency": 0.003, "decode_graph_latency": None}) == pytest.approx(3.0)
