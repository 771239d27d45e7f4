"""Programmatic dependent launch for pymllm's Triton decode kernels.

mllm_kernel.pdl explains the mechanism and owns the decision (process switch, SM90+). The
Triton kernels that run inside a decode step (RMSNorm, SiLU-and-mul, q/k-norm-rope, decode
attention, per-token int8 quantization) take a ``USE_PDL`` constexpr: with it they signal
``gdc_launch_dependents`` and then ``gdc_wait`` before their first load (``enter_dependent``;
in between, decode attention prefetches K/V and the RMSNorms load their weight, data no kernel of
the step writes), so the kernel after them (typically a GEMV) can
start streaming its weights while they run, and they themselves start while the kernel before
them drains. They write nothing before the wait, which keeps the chain as ordered as plain
launches for every buffer a kernel of the step writes.

``launch_options(device, rows)`` gives the keyword arguments for one launch: ``USE_PDL`` and,
when it is set, Triton's ``launch_pdl`` option. Only decode-sized launches (up to
``PDL_MAX_ROWS`` rows) use it: a prefill's kernels run long enough that the launch gap does not
count, and an early-launched kernel's waiting blocks would only hold SM resources next to the
GEMM before it. Triton builds without the griddepcontrol ops (older than 3.4) and mllm_kernel
missing both mean plain launches.
"""

from __future__ import annotations

import functools
import logging
from typing import Dict

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: no Triton kernels to launch
    triton = None

logger = logging.getLogger(__name__)

if triton is not None:

    @triton.jit
    def enter_dependent(USE_PDL: tl.constexpr):
        """A decode kernel's first statement: with ``USE_PDL``, let the next kernel launch, then
        wait for the previous one before any load or store (its contract above). A kernel with
        loads that may precede the wait (decode attention's prefetch) calls the two ops itself."""
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()


@functools.lru_cache(maxsize=None)
def triton_supports_pdl() -> bool:
    """This Triton has the griddepcontrol ops and the ``launch_pdl`` launch option."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda as triton_cuda
    except ImportError:
        return False
    has_ops = hasattr(triton_cuda, "gdc_wait") and hasattr(triton_cuda, "gdc_launch_dependents")
    return has_ops and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.lru_cache(maxsize=None)
def _kernel_pdl():
    """mllm_kernel.pdl, or None without mllm_kernel (looked up once: this runs at every launch)."""
    try:
        from mllm_kernel import pdl as kernel_pdl
    except ImportError:
        return None
    return kernel_pdl


def use_pdl(device: torch.device) -> bool:
    """Whether a Triton decode kernel launched now on ``device`` uses PDL."""
    kernel_pdl = _kernel_pdl()
    return kernel_pdl is not None and kernel_pdl.use_pdl(device) and triton_supports_pdl()


PDL_MAX_ROWS = 256  # rows (tokens, or sequences for decode attention) of a decode-sized launch

_PLAIN: Dict[str, bool] = {"USE_PDL": False}
_PDL: Dict[str, bool] = {"USE_PDL": True, "launch_pdl": True}


def launch_options(device: torch.device, rows: int) -> Dict[str, bool]:
    """Keyword arguments of a Triton launch of ``rows`` rows on ``device`` for a kernel with a
    USE_PDL constexpr."""
    return _PDL if rows <= PDL_MAX_ROWS and use_pdl(device) else _PLAIN


def configure(disabled: bool, device: torch.device) -> bool:
    """Apply ``--server.disable_pdl`` (and mllm_kernel's ``MLLM_KERNEL_DISABLE_PDL``) to this
    process's switch and log what the decode kernels on ``device`` will do; returns whether the
    Triton kernels use PDL."""
    kernel_pdl = _kernel_pdl()
    if kernel_pdl is None:
        return False
    by_environment = kernel_pdl.enabled_by_environment()
    kernel_pdl.set_enabled(not disabled and by_environment)
    if device.type != "cuda":
        return False
    triton_on = use_pdl(device)
    if disabled:
        reason = "off (--server.disable_pdl)"
    elif not by_environment:
        reason = f"off ({kernel_pdl.DISABLE_ENV})"
    elif not kernel_pdl.use_pdl(device):
        reason = f"off (needs compute capability {kernel_pdl.MIN_CAPABILITY[0]}.{kernel_pdl.MIN_CAPABILITY[1]}+)"
    else:
        reason = "on" + ("" if triton_on else " for the CUDA kernels; this Triton lacks griddepcontrol")
    logger.info("Programmatic dependent launch of the decode kernels: %s", reason)
    return triton_on
