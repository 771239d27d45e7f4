"""Command line: ``python -m mllm_kernel show-env | show-config``."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence

import torch
import tvm_ffi

import mllm_kernel  # importing the package also registers its kernels
from mllm_kernel.jit_utils import cache
from mllm_kernel.jit_utils.registry import PACKAGE_DIR, KernelSpec, registered_kernels
from mllm_kernel.jit_utils.target import CUDA_ARCH_ENV, Target, cuda_archs


def _tool_version(name: str, args: Sequence[str], pick: str | None = None) -> str:
    """``path (version line)`` of a command line tool, or "not found"."""
    path = shutil.which(name)
    if path is None:
        return "not found"
    try:
        output = subprocess.run([path, *args], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"{path} (failed to run: {error})"
    lines = [line for line in output.splitlines() if line.strip()]
    chosen = next((line for line in lines if pick and pick in line), lines[0] if lines else "unknown version")
    return f"{path} ({chosen.strip()})"


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


def show_env() -> None:
    rows = [
        ("mllm_kernel", mllm_kernel.__version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("torch", f"{torch.__version__} (built with CUDA {torch.version.cuda})"),
        ("tvm_ffi", tvm_ffi.__version__),
        ("nvcc", _tool_version("nvcc", ["--version"], pick="release")),
        ("c++", _tool_version(os.environ.get("CXX", "c++"), ["--version"])),
        ("ninja", _tool_version("ninja", ["--version"])),
        ("cuda available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            rows.append((f"cuda:{index}", f"{torch.cuda.get_device_name(index)}, capability {major}.{minor}"))
    rows += [
        (CUDA_ARCH_ENV, os.environ.get(CUDA_ARCH_ENV, "(unset)")),
        (cache.CACHE_DIR_ENV, os.environ.get(cache.CACHE_DIR_ENV, "(unset)")),
        ("cache dir", str(cache.cache_root())),
    ]
    _print_table(rows)


def _current_targets() -> dict[str, Target | str]:
    """The target each device compiles for here, or why there is none."""
    targets: dict[str, Target | str] = {"cpu": Target("cpu")}
    if torch.cuda.is_available():
        targets["cuda"] = Target("cuda", cuda_archs(torch.cuda.current_device()))
    elif os.environ.get(CUDA_ARCH_ENV):
        targets["cuda"] = Target("cuda", cuda_archs(0))
    else:
        targets["cuda"] = f"no CUDA device (set {CUDA_ARCH_ENV} to check a CUDA target)"
    return targets


def _cache_status(spec: KernelSpec, target: Target | str) -> str:
    if isinstance(target, str):
        return target
    variants = cache.cached_variants(spec, target)
    if not variants:
        return "not cached"
    return f"cached: {', '.join('<' + ', '.join(args) + '>' for args in variants)}"


def show_config() -> None:
    print(f"cache dir: {cache.cache_root()}")
    targets = _current_targets()
    rows = [("kernel", "device", "target", "sources", "status")]
    for spec in registered_kernels():
        for device in spec.devices:
            target = targets[device]
            sources = ", ".join(
                str(path.relative_to(PACKAGE_DIR)) if path.is_relative_to(PACKAGE_DIR) else str(path)
                for path in spec.sources_for(device)
            )
            tag = target.tag if isinstance(target, Target) else "-"
            rows.append((spec.name, device, tag, sources, _cache_status(spec, target)))
    _print_table(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mllm_kernel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("show-env", help="versions of the toolchain, devices and the cache dir")
    commands.add_parser("show-config", help="registered kernels and whether they are cached for this machine")
    args = parser.parse_args(argv)
    {"show-env": show_env, "show-config": show_config}[args.command]()


if __name__ == "__main__":
    main()
