"""Free-memory accounting that knows about integrated GPUs (Jetson) and the CPU."""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def read_mem_available(meminfo_path: str = "/proc/meminfo") -> int:
    """MemAvailable in bytes: on an integrated GPU the CPU and GPU share this memory."""
    with open(meminfo_path) as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no MemAvailable in {meminfo_path}")


def device_memory(
    device: torch.device, properties: Optional[object] = None, meminfo_path: str = "/proc/meminfo"
) -> Tuple[int, int]:
    """(free, total) bytes usable for the model on `device`.

    cudaMemGetInfo under-reports on Jetson because the GPU allocates from the OS's page cache
    pool, so integrated GPUs use the OS's MemAvailable instead.
    """
    if device.type != "cuda":
        total = _mem_total(meminfo_path)
        return read_mem_available(meminfo_path), total
    props = properties or torch.cuda.get_device_properties(device)
    if getattr(props, "is_integrated", False):
        return read_mem_available(meminfo_path), int(props.total_memory)
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def _mem_total(meminfo_path: str) -> int:
    with open(meminfo_path) as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0
