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
