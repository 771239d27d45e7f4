"""build_in_parallel: several JIT builds at once into the disk cache, then loads without compiling."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch

from mllm_kernel.cuda.jit.create_kv_indices import build_step as kv_indices_build
from mllm_kernel.cuda.jit.store_cache import build_step as store_build
from mllm_kernel.jit_utils import BuildStep, build_in_parallel, cache, compiler
from mllm_kernel.jit_utils.parallel_build import JOBS_ENV, default_jobs, unique_steps

from test_jit import cache_dir, entries, make_fill  # noqa: F401  (cache_dir is a fixture)

CPU = torch.device("cpu")


def test_builds_every_instance_then_calls_load_nothing(cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mllm_kernel")
    fill = make_fill(name="test_fill_parallel")
    steps = [fill.kernel[torch.float32, value, False].build_step(CPU) for value in (1, 2, 3)]
    assert [s.name for s in steps] == [f"test_fill_parallel<float, {v}, false>" for v in (1, 2, 3)]
    assert build_in_parallel(steps, jobs=3) == {}
    assert len(entries(cache_dir, "test_fill_parallel")) == 3
    assert caplog.text.count("compiled kernel test_fill_parallel") == 3
    assert "building 3 JIT kernel(s) on 3 thread(s)" in caplog.text
    caplog.clear()
    for value in (1, 2, 3):  # the same instances: compiled functions memoised, nothing logged
        out = torch.zeros(4)
        fill(out, value, False)
        assert torch.equal(out, torch.full((4,), float(value)))
    assert "compiling" not in caplog.text and "loaded cached" not in caplog.text


def test_instances_of_one_kernel_compile_at_the_same_time(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Both builds must be inside the compiler together to pass the barrier: a lock per kernel
    # (rather than per instance) would serialise them and time the barrier out.
    together = threading.Barrier(2, timeout=60)
    real_build = compiler.build

    def build(*args, **kwargs):
        together.wait()
        return real_build(*args, **kwargs)

    monkeypatch.setattr(compiler, "build", build)
    fill = make_fill(name="test_fill_together")
    steps = [fill.kernel[torch.float32, value, True].build_step(CPU) for value in (4, 5)]
    assert build_in_parallel(steps, jobs=2) == {}
    assert len(entries(cache_dir, "test_fill_together")) == 2


def test_racing_threads_compile_one_instance_once(cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mllm_kernel")
    fill = make_fill(name="test_fill_race")
    instance = fill.kernel[torch.float32, 6, False]
    threads = [threading.Thread(target=instance.load, args=(CPU,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert caplog.text.count("compiling kernel test_fill_race") == 1


def test_failures_are_returned_and_the_rest_still_builds(cache_dir: Path) -> None:
    fill = make_fill(name="test_fill_partly")

    def broken() -> None:
        raise RuntimeError("nvcc exploded")

    steps = [BuildStep("broken", broken), fill.kernel[torch.float32, 7, False].build_step(CPU)]
    failures = build_in_parallel(steps, jobs=2)
    assert list(failures) == ["broken"] and "nvcc exploded" in str(failures["broken"])
    assert len(entries(cache_dir, "test_fill_partly")) == 1


def test_duplicate_steps_run_once() -> None:
    runs = []
    step = BuildStep("k<1>", lambda: runs.append(1))
    assert [s.name for s in unique_steps([step, BuildStep("k<2>", lambda: None), step])] == ["k<1>", "k<2>"]
    build_in_parallel([step, step, step])
    assert runs == [1]
    assert build_in_parallel([]) == {}


def test_a_set_stop_skips_the_steps_not_started(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mllm_kernel")
    stop, runs = threading.Event(), []
    stop.set()
    assert build_in_parallel([BuildStep("k<1>", lambda: runs.append(1))], stop=stop) == {}
    assert runs == [] and "1 skipped: stopped" in caplog.text


def test_job_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(JOBS_ENV, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setattr("mllm_kernel.jit_utils.parallel_build._memory_bytes", lambda: 64 << 30)
    assert default_jobs(12) == 12 and default_jobs(40) == 16  # by cores, never more than the steps
    monkeypatch.setattr("mllm_kernel.jit_utils.parallel_build._memory_bytes", lambda: 8 << 30)
    assert default_jobs(12) == 2  # 3 GiB per build
    monkeypatch.setenv(JOBS_ENV, "3")
    assert default_jobs(12) == 3 and default_jobs(2) == 2
    for bad in ("0", "many"):
        monkeypatch.setenv(JOBS_ENV, bad)
        with pytest.raises(ValueError, match=JOBS_ENV):
            default_jobs(4)


def test_kv_cache_kernels_as_steps(cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    """The KV kernels' steps (CPU builds here) compile the very instances their calls then use."""
    from mllm_kernel.cuda.jit import create_kv_indices, store_cache

    for kernel in (store_cache.kernel, create_kv_indices.kernel):  # no instance loaded by other tests
        monkeypatch.setattr(kernel, "_instances", {})
    caplog.set_level(logging.INFO, logger="mllm_kernel")
    steps = [store_build(torch.float32, CPU), kv_indices_build(CPU)]
    assert [s.name for s in steps] == ["store_cache<float, int64_t>", "create_kv_indices<int64_t, int32_t>"]
    assert build_in_parallel(steps) == {}
    assert caplog.text.count("compiling kernel") == 2 and cache.cache_root() == cache_dir
    caplog.clear()
    k = torch.randn(2, 1, 4)
    k_cache = torch.zeros(5, 1, 4)
    v_cache = torch.zeros(5, 1, 4)
    loc = torch.tensor([3, 1])
    store_cache(k, k, k_cache, v_cache, loc)
    assert torch.equal(k_cache[loc], k)
    assert "compiling" not in caplog.text and "loaded cached" not in caplog.text  # the step's function


def test_arch_variable_is_shared_by_equal_archs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent CUDA builds share TVM_FFI_CUDA_ARCH_LIST when they want the same archs; a build
    for others (the CUTLASS GEMM's 9.0a) waits for them, and the last one out restores it."""
    import os

    env = "TVM_FFI_CUDA_ARCH_LIST"
    monkeypatch.setenv(env, "8.0")
    together = threading.Barrier(2, timeout=30)
    seen: list[str] = []

    def same() -> None:
        with compiler.cuda_arch_env(("9.0",)):
            together.wait()  # both inside at once
            seen.append(os.environ[env])

    threads = [threading.Thread(target=same) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == ["9.0", "9.0"] and os.environ[env] == "8.0"

    holding, release, other_inside = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with compiler.cuda_arch_env(("9.0",)):
            holding.set()
            release.wait(30)

    def other() -> None:
        with compiler.cuda_arch_env(("9.0a",)):
            seen.append(os.environ[env])
            other_inside.set()

    threads = [threading.Thread(target=first), threading.Thread(target=other)]
    threads[0].start()
    holding.wait(30)
    threads[1].start()
    assert not other_inside.wait(0.3)  # blocked while 9.0 is held
    release.set()
    for thread in threads:
        thread.join()
    assert seen[-1] == "9.0a" and os.environ[env] == "8.0"
