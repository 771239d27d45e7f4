"""The JIT machinery: compile, disk cache, cache keys, failures, targets, registry."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import pytest
import torch

from mllm_kernel.jit_utils import cache, compiler, jit
from mllm_kernel.jit_utils.registry import make_spec, register
from mllm_kernel.jit_utils.target import CUDA_ARCH_ENV, Target, cuda_archs, parse_arch_list, target_for
from mllm_kernel.jit_utils.template import render_template_args, to_cpp

FILL_SOURCE = Path(__file__).parent / "csrc" / "fill.h"


def make_fill(source: Path = FILL_SOURCE, name: str = "test_fill"):
    """A fresh wrapper (with its own in-process memo) around the test kernel."""

    @jit(name, entry="mllm_kernel_test::fill", cpu_sources=[source])
    def fill(kernel, out: torch.Tensor, value: int, negate: bool) -> None:
        kernel[out.dtype, value, negate](out)

    return fill


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(path))
    return path


def entries(cache_dir: Path, name: str) -> list[Path]:
    """Cache entries of a kernel, staging directories included."""
    root = cache_dir / name
    return sorted(root.iterdir()) if root.exists() else []


def test_compile_then_load_from_cache(cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mllm_kernel")
    fill = make_fill()
    out = torch.zeros(5)
    fill(out, 7, True)
    assert torch.equal(out, torch.full((5,), -7.0))
    assert "compiling kernel test_fill<float, 7, true> (cpu-" in caplog.text
    assert "compiled kernel test_fill<float, 7, true>" in caplog.text
    [entry] = entries(cache_dir, "test_fill")
    assert (entry / "test_fill.so").is_file() and entry.name.startswith(Target("cpu").tag)

    caplog.clear()
    fill(out, 7, True)  # same process, same instance: no compile, no disk access
    assert caplog.text == ""

    caplog.clear()
    fresh = make_fill()  # a new process would start like this: empty memo, warm disk cache
    fresh(torch.zeros(5), 7, True)
    assert "loaded cached kernel test_fill<float, 7, true>" in caplog.text
    assert "compiling" not in caplog.text
    assert len(entries(cache_dir, "test_fill")) == 1


def test_cache_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(cache.CACHE_DIR_ENV, raising=False)
    assert cache.cache_root() == Path("~/.cache/mllm_kernel").expanduser()
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    assert cache.cache_root() == tmp_path
    spec = make_spec("test_fill", "mllm_kernel_test::fill", {"cpu": [FILL_SOURCE]})
    assert cache.entry_dir(spec, Target("cpu"), ("float",)).parent == tmp_path / "test_fill"


def test_cache_key_tracks_template_args_targets_and_sources(tmp_path: Path) -> None:
    header = tmp_path / "extra.h"
    header.write_text("#pragma once\n")
    source = tmp_path / "fill.h"
    source.write_text('#include "extra.h"\n' + FILL_SOURCE.read_text())
    spec = make_spec("test_key", "mllm_kernel_test::fill", {"cpu": [source], "cuda": [source]})
    cpu = Target("cpu")
    args = ("float", "7", "true")
    key = cache.cache_key(spec, cpu, args)

    assert cache.cache_key(spec, cpu, args) == key
    assert cache.cache_key(spec, cpu, ("float", "7", "false")) != key
    assert cache.cache_key(spec, cpu, ("double", "7", "true")) != key
    sm80 = cache.cache_key(spec, Target("cuda", ("8.0",)), args)
    sm90 = cache.cache_key(spec, Target("cuda", ("9.0",)), args)
    assert len({key, sm80, sm90}) == 3

    # Our headers are found through the include path and through relative
    # includes; editing any of them changes the key.
    assert {path.name for path in cache.source_files(spec, "cpu")} == {"fill.h", "extra.h", "common.h"}
    header.write_text("#pragma once\n// edited\n")
    edited_header = cache.cache_key(spec, cpu, args)
    source.write_text(source.read_text() + "\n// edited\n")
    edited_source = cache.cache_key(spec, cpu, args)
    assert len({key, edited_header, edited_source}) == 3


def test_failed_build_leaves_no_cache_entry(cache_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "broken.h"
    source.write_text(FILL_SOURCE.read_text().replace("data[i] =", "data[i] = undeclared_symbol +"))
    fill = make_fill(source, name="test_broken")
    expected = r"failed to compile kernel test_broken<float, 1, false>(.|\n)*undeclared_symbol"
    with pytest.raises(RuntimeError, match=expected):
        fill(torch.zeros(2), 1, False)
    assert entries(cache_dir, "test_broken") == []

    # Fixing the source changes the key; the next call compiles and works.
    shutil.copy(FILL_SOURCE, source)
    out = torch.zeros(2)
    fill(out, 1, False)
    assert torch.equal(out, torch.ones(2))
    assert len(entries(cache_dir, "test_broken")) == 1


def test_concurrent_builds_publish_one_entry(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two builders race on one entry: both succeed, one copy survives, no staging is left."""
    both_building = threading.Barrier(2)

    def fake_build(spec, target, template_args, build_dir: Path, output=None) -> Path:
        both_building.wait(timeout=10)
        library = build_dir / f"{spec.name}.so"
        library.write_bytes(b"stub")
        return library

    monkeypatch.setattr(compiler, "build", fake_build)
    spec = make_spec("test_race", "unused", {"cpu": [FILL_SOURCE]})
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.load_or_build(spec, Target("cpu"), ("float",))))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [entry] = entries(cache_dir, "test_race")
    assert results == [entry / "test_race.so"] * 2
    assert sorted(path.name for path in entry.iterdir()) == ["meta.json", "test_race.so"]


def test_cached_variants_lists_current_builds_only(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_build(spec, target, template_args, build_dir: Path, output=None) -> Path:
        (build_dir / f"{spec.name}.so").write_bytes(b"stub")
        return build_dir / f"{spec.name}.so"

    monkeypatch.setattr(compiler, "build", fake_build)
    spec = make_spec("test_variants", "unused", {"cpu": [FILL_SOURCE]})
    cache.load_or_build(spec, Target("cpu"), ("float",))
    cache.load_or_build(spec, Target("cpu"), ("double",))
    assert sorted(cache.cached_variants(spec, Target("cpu"))) == [("double",), ("float",)]
    assert cache.cached_variants(spec, Target("cuda", ("9.0",))) == []
    monkeypatch.setattr(compiler, "CXX_FLAGS", ("-O1",))  # new flags: old builds are stale
    assert cache.cached_variants(spec, Target("cpu")) == []


def test_template_arguments() -> None:
    assert render_template_args((torch.float32, 3, True, False), "cpu") == ("float", "3", "true", "false")
    assert to_cpp(torch.bfloat16, "cuda") == "__nv_bfloat16"
    assert to_cpp(torch.float16, "cuda") == "__half"
    assert to_cpp(torch.bfloat16, "cpu") == "mllm_kernel::bf16_t"
    assert to_cpp(torch.int64, "cuda") == "int64_t"
    with pytest.raises(TypeError, match="not supported"):
        to_cpp(1.5, "cpu")
    with pytest.raises(TypeError, match="no C\\+\\+ type"):
        to_cpp(torch.complex64, "cpu")


def test_cuda_arch_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_arch_list("8.0 9.0a") == ("8.0", "9.0a")
    assert parse_arch_list("sm_90, sm_80;90") == ("9.0", "8.0")
    assert parse_arch_list("10.0f") == ("10.0f",)
    with pytest.raises(ValueError, match="invalid CUDA arch"):
        parse_arch_list("hopper")
    assert Target("cuda", ("8.0", "9.0a")).tag == "sm_80+sm_90a"
    monkeypatch.setenv(CUDA_ARCH_ENV, "8.7")
    assert cuda_archs(0) == ("8.7",)  # the override needs no GPU


def test_call_errors(cache_dir: Path) -> None:
    fill = make_fill()
    with pytest.raises(ValueError, match="at least one tensor"):
        fill.kernel[torch.float32, 1, True](3)
    with pytest.raises(ValueError, match="one device"):
        fill.kernel[torch.float32, 1, True](torch.zeros(1), torch.zeros(1, device="meta"))
    with pytest.raises(ValueError, match="supports cpu and cuda"):
        target_for(torch.device("meta"))
    spec = make_spec("test_cpu_only", "unused", {"cpu": [FILL_SOURCE]})
    with pytest.raises(NotImplementedError, match="no cuda implementation"):
        spec.sources_for("cuda")
    assert entries(cache_dir, "test_fill") == []


def test_registry_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="C identifier"):
        make_spec("bad-name", "f", {"cpu": [FILL_SOURCE]})
    with pytest.raises(FileNotFoundError, match="missing cpu sources"):
        make_spec("test_missing", "f", {"cpu": [tmp_path / "nope.h"]})
    with pytest.raises(ValueError, match="unknown devices"):
        make_spec("test_rocm", "f", {"rocm": [FILL_SOURCE]})
    register(make_spec("test_twice", "f", {"cpu": [FILL_SOURCE]}))
    register(make_spec("test_twice", "f", {"cpu": [FILL_SOURCE]}))  # identical: fine
    with pytest.raises(ValueError, match="already registered"):
        register(make_spec("test_twice", "g", {"cpu": [FILL_SOURCE]}))
