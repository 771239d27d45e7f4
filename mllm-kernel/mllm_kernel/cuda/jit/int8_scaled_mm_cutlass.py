"""int8_scaled_mm: CUTLASS int8 tensor-core GEMM with per-row/per-column scales and bias.

``out = (a @ b) * scale_a * scale_b (+ bias)`` with a int8 [M, K] row-major, b int8 [K, N]
column-major (a row-major [N, K] weight, transposed as a view), exact int32 accumulation and
a float32 epilogue writing fp16/bf16. Two builds: the CUTLASS 3.x wgmma kernel for SM90
(compiled for sm_90a) and the CUTLASS 2.x mma.sync kernel for SM80-SM89 (also valid on SM90).

CUTLASS is header-only and heavy, so the build differs from the plain ``@jit`` kernels in two
ways: its include directories (``CUTLASS_HOME/include``, else FlashInfer's bundled copy, else
system include paths) and ``-DNDEBUG`` (device asserts are function calls, which serialize
wgmma). Builds land in the same cache as ``@jit`` kernels (``~/.cache/mllm_kernel`` or
``MLLM_KERNEL_CACHE_DIR``), keyed by sources, flags, target and the CUTLASS headers used.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mllm_kernel.jit_utils import BuildStep, cache, compiler
from mllm_kernel.jit_utils.registry import KernelSpec, make_spec
from mllm_kernel.jit_utils.target import SM90A, Target, device_capability, target_for
from mllm_kernel.jit_utils.template import render_template_args

logger = logging.getLogger(__name__)

CUTLASS_HOME_ENV = "CUTLASS_HOME"
OUT_DTYPES = (torch.float16, torch.bfloat16)
# -DNDEBUG: CUTLASS device asserts become calls that make ptxas serialize wgmma (C7510).
CUTLASS_CUDA_FLAGS = (*compiler.CUDA_FLAGS, "-DNDEBUG")
_SYSTEM_INCLUDE_DIRS = ("/usr/local/include", "/usr/include", "/usr/local/cuda/include")
_SOURCES = {
    "sm80": "cuda/csrc/int8_scaled_mm/int8_scaled_mm_sm80.cuh",
    "sm90": "cuda/csrc/int8_scaled_mm/int8_scaled_mm_sm90.cuh",
}
_OP = "int8_scaled_mm"


class CutlassNotFoundError(RuntimeError):
    """No CUTLASS headers in CUTLASS_HOME, FlashInfer's package data or the system include paths."""


def _has_cutlass(include: Path) -> bool:
    return (include / "cutlass" / "cutlass.h").is_file() and (include / "cute" / "tensor.hpp").is_file()


def find_cutlass_include_dirs() -> List[Path]:
    """CUTLASS include directories (``include`` plus ``tools/util/include`` where present)."""
    tried = []
    home = os.environ.get(CUTLASS_HOME_ENV)
    if home:
        include = Path(home).expanduser() / "include"
        if not _has_cutlass(include):
            raise CutlassNotFoundError(f"{CUTLASS_HOME_ENV}={home} has no include/cutlass/cutlass.h")
        roots = [Path(home).expanduser()]
    else:
        roots = []
        spec = importlib.util.find_spec("flashinfer")  # locate the package without importing it
        if spec is not None and spec.submodule_search_locations:
            roots += [Path(p) / "data" / "cutlass" for p in spec.submodule_search_locations]
    for root in roots:
        tried.append(str(root / "include"))
        if _has_cutlass(root / "include"):
            util = root / "tools" / "util" / "include"
            return [root / "include", *([util] if util.is_dir() else [])]
    for system in _SYSTEM_INCLUDE_DIRS:
        tried.append(system)
        if _has_cutlass(Path(system)):
            return [Path(system)]
    raise CutlassNotFoundError(
        "CUTLASS headers not found (tried " + ", ".join(tried) + "); set CUTLASS_HOME to a CUTLASS "
        "checkout or install flashinfer-python, which bundles them"
    )


def nvcc_path() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def unavailable_reason() -> Optional[str]:
    """Why the CUTLASS kernels cannot be built here, or None when they can."""
    if nvcc_path() is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    try:
        find_cutlass_include_dirs()
    except CutlassNotFoundError as error:
        return str(error)
    return None


def variant_for(device: torch.device) -> Optional[str]:
    """The build that runs on ``device``: sm90 on Hopper, sm80 on SM80-SM89 and newer, else None."""
    if device.type != "cuda":
        return None
    major, minor = device_capability(device)
    if (major, minor) == (9, 0):
        return "sm90"
    return "sm80" if major >= 8 else None


@functools.lru_cache(maxsize=None)
def kernel_spec(variant: str) -> KernelSpec:
    return make_spec(f"cutlass_int8_scaled_mm_{variant}", f"mllm_kernel::int8_scaled_mm_{variant}",
                     {"cuda": [_SOURCES[variant]]})


def build_target(variant: str, device: torch.device) -> Target:
    """sm_90a for the wgmma kernel (arch-specific features); the device's own arch otherwise."""
    if variant == "sm90":
        return SM90A
    return target_for(device)


def _cutlass_fingerprint(include_dirs: Sequence[Path]) -> str:
    version = (include_dirs[0] / "cutlass" / "version.h").read_bytes()
    return f"{include_dirs[0]}:{hashlib.sha256(version).hexdigest()[:16]}"


def _cache_key(spec: KernelSpec, target: Target, template_args: Sequence[str], include_dirs: Sequence[Path]) -> str:
    sources = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in cache.source_files(spec, "cuda"))
    description = {
        "name": spec.name,
        "entry": spec.entry,
        "template_args": list(template_args),
        "target": target.tag,
        "sources": sources,
        "flags": list(CUTLASS_CUDA_FLAGS) + list(compiler.CXX_FLAGS),
        "cutlass": _cutlass_fingerprint(include_dirs),
        "nvcc": nvcc_path(),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def build(spec: KernelSpec, target: Target, template_args: Sequence[str], build_dir: Path,
          output: Optional[str] = None) -> Path:
    """Compile into ``build_dir``: the shared library, or an object file when ``output`` ends in .o."""
    import tvm_ffi.cpp

    include_dirs = find_cutlass_include_dirs()
    wrapper = build_dir / f"{spec.name}_export.cu"
    wrapper.write_text(compiler.render_wrapper(spec, "cuda", template_args))
    # tvm_ffi reads the archs only from the environment, shared with the other builds.
    with compiler.cuda_arch_env(target.archs):
        path = tvm_ffi.cpp.build(
            name=spec.name,
            sources=[str(wrapper)],
            extra_cflags=list(compiler.CXX_FLAGS),
            extra_cuda_cflags=list(CUTLASS_CUDA_FLAGS),
            extra_include_paths=[str(p) for p in (*compiler.include_dirs("cuda"), *include_dirs)],
            build_directory=str(build_dir),
            backend="cuda",
            output=output,
        )
    return Path(path)


def load_or_build(spec: KernelSpec, target: Target, template_args: Sequence[str]) -> Path:
    """The cached library, compiled first (minutes, logged with timing) when missing."""
    include_dirs = find_cutlass_include_dirs()
    entry = cache.cache_root() / spec.name / f"{target.tag}-{_cache_key(spec, target, template_args, include_dirs)}"
    library = entry / f"{spec.name}.so"
    if library.is_file():
        logger.info("loaded cached kernel %s (%s)", spec.name, target.tag)
        return library
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        message = f"compiling {_OP} for {target.tag} (first use, ~1-2 min)..."
        logger.info(message)
        start = time.perf_counter()
        try:
            build(spec, target, template_args, staging)
        except RuntimeError as error:
            raise RuntimeError(f"failed to compile {spec.name} ({target.tag}) with CUTLASS from "
                               f"{include_dirs[0]}:\n{error}") from None
        logger.info("%s done in %.1f s (cached in %s)", message, time.perf_counter() - start, entry)
        (staging / "meta.json").write_text(json.dumps({"name": spec.name, "template_args": list(template_args),
                                                       "target": target.tag, "cutlass": str(include_dirs[0])}))
        try:
            os.rename(staging, entry)
        except OSError:
            if not library.is_file():  # not a lost race with another process building the same entry
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return library


@dataclass(frozen=True)
class _Instance:
    variant: str
    out_dtype: torch.dtype
    device_index: int


_functions: Dict[_Instance, Callable[..., None]] = {}
_load_lock = threading.Lock()


def load_kernel(variant: str, out_dtype: torch.dtype, device: torch.device) -> Callable[..., None]:
    """The compiled entry point for (build, output dtype, device), compiling it on first use.
    Calling it ahead of time (e.g. one process per build, in parallel) warms the disk cache."""
    key = _Instance(variant, out_dtype, device.index if device.index is not None else torch.cuda.current_device())
    function = _functions.get(key)
    if function is None:
        import tvm_ffi

        with _load_lock:  # one compile per instance even when threads race here
            function = _functions.get(key)
            if function is None:
                spec = kernel_spec(variant)
                library = load_or_build(spec, build_target(variant, device), render_template_args([out_dtype], "cuda"))
                function = getattr(tvm_ffi.load_module(str(library)), spec.name)
                _functions[key] = function
    return function


def build_step(device: torch.device, out_dtype: torch.dtype) -> Optional[BuildStep]:
    """``load_kernel`` of the build that runs on ``device`` as a build_in_parallel step; None
    where no build runs there."""
    variant = variant_for(device)
    if variant is None:
        return None
    return BuildStep(f"int8_scaled_mm_{variant}<{out_dtype}>".replace("torch.", ""),
                     lambda: load_kernel(variant, out_dtype, device))


def check_arguments(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                    out_dtype: torch.dtype, bias: Optional[torch.Tensor]) -> Tuple[int, int, int]:
    """Validate shapes, dtypes, layouts and alignment; returns (M, N, K)."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype != torch.int8:
            raise TypeError(f"{_OP}: {name} must be a 2-D int8 tensor")
    m, k = a.shape
    if b.shape[0] != k:
        raise ValueError(f"{_OP}: a is [M, K] = {tuple(a.shape)}, so b must be [K, N] with K = {k}, got {tuple(b.shape)}")
    n = b.shape[1]
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"{_OP}: out_dtype must be float16 or bfloat16, got {out_dtype}")
    if a.stride(1) != 1 and k > 1:
        raise ValueError(f"{_OP}: a must be row-major (stride(1) == 1), got strides {a.stride()}")
    if b.stride(0) != 1 and k > 1:
        raise ValueError(f"{_OP}: b must be column-major (stride(0) == 1, e.g. weight.t()), got strides {b.stride()}")
    if k % 16 or n % 8 or (m > 1 and a.stride(0) % 16) or (n > 1 and b.stride(1) % 16):
        raise ValueError(f"{_OP}: needs K % 16 == 0, N % 8 == 0 and 16-aligned leading dims; got M={m}, N={n}, K={k}")
    if scale_a.dtype != torch.float32 or scale_a.numel() != m or not scale_a.is_contiguous():
        raise ValueError(f"{_OP}: scale_a must be contiguous float32 [M, 1] or [M] (M={m}), got {tuple(scale_a.shape)}")
    if scale_b.dtype != torch.float32 or scale_b.numel() != n or not scale_b.is_contiguous():
        raise ValueError(f"{_OP}: scale_b must be contiguous float32 [N] or [1, N] (N={n}), got {tuple(scale_b.shape)}")
    if bias is not None and (bias.dtype != out_dtype or bias.numel() != n or not bias.is_contiguous()):
        raise ValueError(f"{_OP}: bias must be a contiguous [N] tensor of the output dtype")
    tensors = [a, b, scale_a, scale_b] + ([bias] if bias is not None else [])
    if any(t.device != a.device for t in tensors) or a.device.type != "cuda":
        raise ValueError(f"{_OP}: all tensors must be on the same CUDA device")
    for name, t in (("a", a), ("b", b), ("scale_b", scale_b), ("bias", bias)):
        if t is not None and t.data_ptr() % 16:
            raise ValueError(f"{_OP}: {name} must be 16-byte aligned")
    return m, n, k


def _run(variant: str, a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
         out_dtype: torch.dtype, bias: Optional[torch.Tensor], out: Optional[torch.Tensor]) -> torch.Tensor:
    m, n, _ = check_arguments(a, b, scale_a, scale_b, out_dtype, bias)
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    elif out.shape != (m, n) or out.dtype != out_dtype or not out.is_contiguous() or out.device != a.device:
        raise ValueError(f"{_OP}: out must be a contiguous [{m}, {n}] {out_dtype} tensor on {a.device}")
    if m:
        load_kernel(variant, out_dtype, a.device)(out, a, b, scale_a, scale_b, bias)
    return out


def int8_scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                   out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The CUTLASS GEMM for this GPU (sm90 build on Hopper, sm80 build on SM80+ otherwise);
    ``out`` (contiguous [M, N] of ``out_dtype``) is written in place when given."""
    variant = variant_for(a.device)
    if variant is None:
        raise RuntimeError(f"{_OP}: needs a CUDA device of compute capability 8.0 or newer, got {a.device}")
    return _run(variant, a, b, scale_a, scale_b, out_dtype, bias, out)


def int8_scaled_mm_sm80(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                        out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The CUTLASS 2.x build, on any SM80+ GPU (the benchmark compares it with sm90 on Hopper)."""
    return _run("sm80", a, b, scale_a, scale_b, out_dtype, bias, out)


def int8_scaled_mm_sm90(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                        out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The CUTLASS 3.x build; SM90 (compute capability 9.0) only."""
    if variant_for(a.device) != "sm90":
        raise RuntimeError(f"{_OP}: the sm90 build needs compute capability 9.0, got {a.device}")
    return _run("sm90", a, b, scale_a, scale_b, out_dtype, bias, out)


def int8_scaled_mm_reference(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                             out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-PyTorch equivalent (float64 products are exact for int8 inputs of any practical K)."""
    acc = a.double() @ b.double()
    out = acc * scale_a.double().reshape(-1, 1) * scale_b.double().reshape(1, -1)
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)

