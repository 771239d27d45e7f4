"""What a kernel is compiled for: CPU, or CUDA for a list of architectures."""

from __future__ import annotations

import functools
import os
import platform
import re
from dataclasses import dataclass
from typing import Tuple

import torch

CUDA_ARCH_ENV = "MLLM_KERNEL_CUDA_ARCH_LIST"

# "9.0", "9.0a", "90", "sm_90a", "10.0f": major, minor, optional suffix.
_ARCH_RE = re.compile(r"^(?:sm_)?(\d+)\.?(\d)([af]?)$")


@dataclass(frozen=True)
class Target:
    """A compilation target: ``device`` is "cpu" or "cuda"; ``archs`` holds
    CUDA compute capabilities written "major.minor[suffix]" (e.g. "9.0a")."""

    device: str
    archs: tuple[str, ...] = ()

    @property
    def tag(self) -> str:
        """Short name used in logs and cache paths, e.g. "sm_90" or "cpu-x86_64"."""
        if self.device == "cpu":
            return f"cpu-{platform.machine()}"
        return "+".join("sm_" + arch.replace(".", "") for arch in self.archs)


# Hopper's arch-specific build (wgmma, TMA): kernels that need it run on SM 9.0 only.
SM90A = Target("cuda", ("9.0a",))


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: "torch.device") -> Tuple[int, int]:
    """(major, minor) of a CUDA device, cached (dispatchers ask per call); (0, 0) for any other."""
    if device.type != "cuda":
        return (0, 0)
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def parse_arch_list(text: str) -> tuple[str, ...]:
    """Parse an arch list such as "8.0 9.0a" or "sm_80,sm_90" (separated by
    spaces, commas or semicolons) into normalised "major.minor[suffix]" strings."""
    archs = []
    for item in re.split(r"[\s,;]+", text.strip()):
        if not item:
            continue
        match = _ARCH_RE.match(item)
        if match is None:
            raise ValueError(
                f"invalid CUDA arch {item!r} in {CUDA_ARCH_ENV}; expected forms like '9.0', '9.0a' or 'sm_90'"
            )
        major, minor, suffix = match.groups()
        archs.append(f"{int(major)}.{minor}{suffix}")
    if not archs:
        raise ValueError(f"{CUDA_ARCH_ENV} is set but lists no architecture")
    return tuple(dict.fromkeys(archs))


def cuda_archs(device_index: int) -> tuple[str, ...]:
    """Architectures to build for: the env override if set, else the device's."""
    override = os.environ.get(CUDA_ARCH_ENV)
    if override:
        return parse_arch_list(override)
    major, minor = torch.cuda.get_device_capability(device_index)
    return (f"{major}.{minor}",)


def target_for(device: torch.device) -> Target:
    """The target that runs on ``device`` (a torch device of type cpu or cuda)."""
    if device.type == "cpu":
        return Target("cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return Target("cuda", cuda_archs(index))
    raise ValueError(f"mllm_kernel supports cpu and cuda tensors, got a tensor on {device}")
