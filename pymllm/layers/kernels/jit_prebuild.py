"""The model's JIT kernel builds, in parallel and while its weights load.

A first start compiles a dozen mllm_kernel instances (the decode GEMVs of the weight kind and
their fused forms, the CUTLASS W8A8 GEMM, the KV-cache kernels). Built lazily, one at a time, by
the self-tests in ``process_weights_after_loading`` they took over three minutes for a W8A8
model on an H200 host. ``start_kernel_builds`` asks every linear method which builds it will
need (``LinearMethodBase.jit_kernels``), adds the LM head's GEMV, the KV-cache kernels and the
attention backend's builds (the loader's ``extra_builds``), and runs them on a background thread
pool (``mllm_kernel.jit_utils.build_in_parallel``) while the loader reads the checkpoint; the
loader's ``with`` block joins them before the self-tests, which then load from the disk cache.
Nothing depends on this list being complete: a kernel not listed builds on first use.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Callable, Iterable, List, Optional

import torch
from torch import nn

from pymllm.layers.kernels.gemv_dispatch import decode_kernels_run_on

if TYPE_CHECKING:
    from mllm_kernel.jit_utils import BuildStep

logger = logging.getLogger(__name__)


def gemv_builds(kinds: Iterable[str], device: torch.device, dtype: torch.dtype) -> List["BuildStep"]:
    """mllm_kernel GEMV instances of ``kinds`` (see gemv_kernels.BUILD_KINDS) where they run."""
    if not decode_kernels_run_on(device, dtype):
        return []
    from mllm_kernel.cuda.jit import gemv_kernels

    return [step for kind in kinds for step in gemv_kernels.build_steps(kind, dtype, device)]


def w4a16_builds(device: torch.device, dtype: torch.dtype, with_zeros: bool, gated: bool) -> List["BuildStep"]:
    """The W4A16 GEMV (and, for a stacked gate/up layer, its gated form) and the tensor-core GEMMs
    where they run."""
    if not decode_kernels_run_on(device, dtype):
        return []
    # By module path: the package's w4a16_gemv attribute is the function, not the module.
    from mllm_kernel.cuda.jit.w4a16_gemm import build_steps as gemm_builds
    from mllm_kernel.cuda.jit.w4a16_gemv import build_step

    gemvs = [build_step(dtype, with_zeros, g, device) for g in ((False, True) if gated else (False,))]
    return gemvs + gemm_builds(dtype, with_zeros, device)


def kv_cache_builds(device: torch.device, dtype: torch.dtype) -> List["BuildStep"]:
    """The KV store and kv_indices kernels (pymllm.layers.kernels.kv_cache_ops) on CUDA."""
    if device.type != "cuda":
        return []
    from mllm_kernel.cuda.jit.create_kv_indices import build_step as kv_indices_build
    from mllm_kernel.cuda.jit.store_cache import build_step as store_build

    return [store_build(dtype, device), kv_indices_build(device)]


def model_builds(model: nn.Module, device: torch.device, dtype: torch.dtype) -> List["BuildStep"]:
    """Every JIT build the model's layers, LM head and KV cache will ask for (duplicates kept;
    build_in_parallel drops them)."""
    steps = gemv_builds(("dense",), device, dtype) + kv_cache_builds(device, dtype)
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            steps += method.jit_kernels(module, device, dtype)
    return steps


class KernelBuilds:
    """Builds running on a background thread. Used as a context manager around the weight
    loading: a clean exit joins them, an exception (a bad checkpoint, Ctrl-C) stops the builds not
    yet started and leaves the running ones to finish on their own."""

    def __init__(self, steps: List["BuildStep"]):
        from mllm_kernel.jit_utils import build_in_parallel
        from mllm_kernel.jit_utils.parallel_build import default_jobs, unique_steps

        steps = unique_steps(steps)
        jobs = default_jobs(len(steps))  # a bad MLLM_KERNEL_JIT_JOBS fails here, not in the thread
        self.failures: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(build_in_parallel, steps, jobs), daemon=True,
                                        name="pymllm-kernel-builds")
        self._thread.start()

    def _run(self, build_in_parallel, steps, jobs) -> None:
        self.failures = build_in_parallel(steps, jobs, self._stop)

    def wait(self) -> None:
        try:
            self._thread.join()
        except BaseException:  # interrupted while waiting
            self.cancel()
            raise

    def cancel(self) -> None:
        self._stop.set()

    def __enter__(self) -> "KernelBuilds":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.wait()
        else:
            self.cancel()


def start_kernel_builds(model: nn.Module, device: torch.device, dtype: torch.dtype,
                        extra: Optional[Callable[[nn.Module], List["BuildStep"]]] = None):
    """Start the model's kernel builds (and ``extra(model)``'s) in the background: a KernelBuilds,
    or a null context when there is nothing to build (CPU, or mllm_kernel not importable: the
    layers then fall back on their own)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    try:
        steps = model_builds(model, device, dtype) + (extra(model) if extra is not None else [])
    except ImportError as error:
        logger.info("no kernel builds ahead of the load: mllm_kernel not importable (%s)", error)
        return contextlib.nullcontext()
    return KernelBuilds(steps) if steps else contextlib.nullcontext()
