"""Programmatic dependent launch (PDL): whether the decode kernels launch as programmatic
dependents of the kernel before them.

A small-batch decode step is a chain of short kernels, each reading the previous one's output.
Launched plainly, a kernel starts only after the previous one has drained completely, so every
boundary costs the launch latency plus the ramp-up of the next kernel's memory stream. On SM90
and newer a kernel launched with the programmatic-stream-serialization attribute may start as
soon as every block of the previous kernel has signalled (``griddepcontrol.launch_dependents``);
it then issues the loads that depend on nothing in the step (a GEMV's weights), and waits
(``griddepcontrol.wait``) for the previous kernel's completion before it reads activations or
writes anything. See ``cuda/csrc/pdl.cuh`` for the kernel-side contract.

A GEMV launched that way also prefetches the first part of its weight into L2 before the wait
(``l2_prefetch_bytes``; ``MLLM_KERNEL_L2_PREFETCH_MB``, default 16).

``use_pdl(device)`` is the one decision every launch site asks: the process-wide switch (on by
default; ``set_enabled(False)`` or ``MLLM_KERNEL_DISABLE_PDL=1`` turns it off), a CUDA device,
and compute capability 9.0 or newer (Jetson Orin, SM87, and the SM80 cards run without it).
"""

from __future__ import annotations

import os
from typing import Dict, Tuple

import torch

DISABLE_ENV = "MLLM_KERNEL_DISABLE_PDL"
MIN_CAPABILITY = (9, 0)
# Weight bytes a PDL-launched GEMV may pull into L2 before its wait (MiB; l2_prefetch_bytes).
PREFETCH_ENV = "MLLM_KERNEL_L2_PREFETCH_MB"
DEFAULT_PREFETCH_MB = 16


def enabled_by_environment() -> bool:
    """False when ``MLLM_KERNEL_DISABLE_PDL`` is set to anything but "", "0", "false" or "no"."""
    return os.environ.get(DISABLE_ENV, "0").strip().lower() in ("", "0", "false", "no")


_enabled = enabled_by_environment()
_capable: Dict[int, bool] = {}  # device index -> capability >= MIN_CAPABILITY


def set_enabled(enabled: bool) -> None:
    """Turn PDL launches on or off for this process (kernels launched afterwards follow it)."""
    global _enabled
    _enabled = bool(enabled)


def is_enabled() -> bool:
    """The process-wide switch (a device may still not support PDL; see use_pdl)."""
    return _enabled


def capability_supports_pdl(capability: Tuple[int, int]) -> bool:
    """PDL needs the griddepcontrol instructions of SM90 (Hopper) and newer."""
    return tuple(capability) >= MIN_CAPABILITY


def use_pdl(device: torch.device) -> bool:
    """Whether a kernel launched now on ``device`` should carry the PDL attribute."""
    if not _enabled or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    capable = _capable.get(index)
    if capable is None:
        capable = _capable[index] = capability_supports_pdl(torch.cuda.get_device_capability(index))
    return capable


def _prefetch_from_environment() -> int:
    raw = os.environ.get(PREFETCH_ENV, "").strip()
    try:
        mib = float(raw) if raw else DEFAULT_PREFETCH_MB
    except ValueError:
        raise ValueError(f"{PREFETCH_ENV} must be a number of MiB, got {raw!r}") from None
    if mib < 0:
        raise ValueError(f"{PREFETCH_ENV} must be >= 0, got {raw!r}")
    return int(mib * 2**20)


_prefetch_bytes = _prefetch_from_environment()


def set_l2_prefetch_bytes(nbytes: int) -> None:
    """The per-launch L2 prefetch budget of the GEMVs for this process (0 turns it off)."""
    global _prefetch_bytes
    if nbytes < 0:
        raise ValueError(f"the L2 prefetch budget must be >= 0 bytes, got {nbytes}")
    _prefetch_bytes = int(nbytes)


def l2_prefetch_bytes(device: torch.device) -> int:
    """Bytes of its weight a GEMV launched now on ``device`` prefetches into L2 before its PDL
    wait: while the kernel before it (a norm, the attention: short and latency-bound) runs, HBM
    would otherwise idle. The whole weight when it fits the budget, else the same leading share
    of every row. 0 without PDL, where there is no wait to overlap."""
    return _prefetch_bytes if use_pdl(device) else 0
