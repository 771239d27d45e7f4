"""Registry of JIT kernels, so tools can list them without compiling anything."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent

DEVICES = ("cpu", "cuda")

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class KernelSpec:
    """A kernel's identity.

    ``entry`` is the C++ function (template) exported under ``name``;
    ``sources`` maps a device ("cpu" or "cuda") to the headers that define
    ``entry`` for that device, as absolute paths.
    """

    name: str
    entry: str
    sources: tuple[tuple[str, tuple[Path, ...]], ...]

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(device for device, _ in self.sources)

    def sources_for(self, device: str) -> tuple[Path, ...]:
        for source_device, paths in self.sources:
            if source_device == device:
                return paths
        raise NotImplementedError(
            f"kernel {self.name!r} has no {device} implementation (has: {', '.join(self.devices)})"
        )


def make_spec(name: str, entry: str, sources: dict[str, list[str | Path]]) -> KernelSpec:
    """Build a spec; relative source paths are taken relative to the mllm_kernel package."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"kernel name {name!r} must be a C identifier (it names the exported symbol)")
    unknown = set(sources) - set(DEVICES)
    if unknown:
        raise ValueError(f"kernel {name!r}: unknown devices {sorted(unknown)}; expected a subset of {DEVICES}")
    resolved = []
    for device in DEVICES:
        paths = tuple((PACKAGE_DIR / path).resolve() for path in sources.get(device, ()))
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"kernel {name!r}: missing {device} sources {missing}")
        if paths:
            resolved.append((device, paths))
    if not resolved:
        raise ValueError(f"kernel {name!r} has no sources")
    return KernelSpec(name, entry, tuple(resolved))


_REGISTRY: dict[str, KernelSpec] = {}


def register(spec: KernelSpec) -> None:
    """Add a kernel; registering an identical spec again is a no-op."""
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing != spec:
        raise ValueError(f"a different kernel named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def registered_kernels() -> list[KernelSpec]:
    return sorted(_REGISTRY.values(), key=lambda spec: spec.name)
