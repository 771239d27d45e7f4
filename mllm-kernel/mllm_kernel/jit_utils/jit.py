"""The ``@jit`` decorator: Python wrapper in front, compiled-on-demand C++ behind.

Usage::

    @jit("store_cache", entry="mllm_kernel::store_cache",
         cuda_sources=["cuda/csrc/store_cache/store_cache.cuh"],
         cpu_sources=["cpu/csrc/store_cache/store_cache.h"])
    def store_cache(kernel, k, v, k_cache, v_cache, loc):
        ...  # validate
        kernel[k.dtype, loc.dtype](k, v, k_cache, v_cache, loc)

``kernel[T1, T2, ...]`` names the C++ instance ``entry<T1, T2, ...>``; calling
it picks CPU or CUDA from the tensor arguments' device, compiles (or loads
from the cache) on first use, and afterwards costs a dictionary lookup.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import torch
import tvm_ffi

from mllm_kernel.jit_utils import cache
from mllm_kernel.jit_utils.parallel_build import BuildStep
from mllm_kernel.jit_utils.registry import KernelSpec, make_spec, register
from mllm_kernel.jit_utils.target import Target, target_for
from mllm_kernel.jit_utils.template import render_template_args

P = ParamSpec("P")
R = TypeVar("R")


def _device_of(args: Sequence[Any]) -> torch.device:
    device = None
    for arg in args:
        if isinstance(arg, torch.Tensor):
            if device is None:
                device = arg.device
            elif arg.device != device:
                raise ValueError(f"all tensor arguments must be on one device, got {device} and {arg.device}")
    if device is None:
        raise ValueError("a kernel call needs at least one tensor argument to pick the device")
    return device


class KernelInstance:
    """One template instantiation; compiled once per device it is called on."""

    def __init__(self, kernel: JitKernel, template_args: tuple[Any, ...]) -> None:
        self._kernel = kernel
        self._template_args = template_args
        self._functions: dict[torch.device, Callable[..., Any]] = {}
        # Per instance, so that different instances of one kernel can compile in parallel
        # (build_in_parallel) while racing threads still compile each instance once.
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> Any:
        device = _device_of(args)
        function = self._functions.get(device)
        if function is None:
            function = self.load(device)
        return function(*args)

    def name(self, device_type: str = "cuda") -> str:
        """``entry<args>`` as the build logs name it, e.g. ``gemv<__nv_bfloat16>``."""
        return cache.describe(self._kernel.spec, render_template_args(self._template_args, device_type))

    def load(self, device: torch.device) -> Callable[..., Any]:
        """Compile (or load from the disk cache) this instance for ``device``, once."""
        with self._lock:
            function = self._functions.get(device)
            if function is None:
                function = self._kernel.load(device, self._template_args)
                self._functions[device] = function
            return function

    def build_step(self, device: torch.device) -> BuildStep:
        """This instance's compile for ``device`` as a step of ``build_in_parallel``."""
        return BuildStep(self.name(device.type), lambda: self.load(device))


class JitKernel:
    """A registered kernel; ``kernel[template args]`` gives a callable instance."""

    def __init__(self, spec: KernelSpec, target_of: Callable[[torch.device], Target] = target_for) -> None:
        self.spec = spec
        self.target_of = target_of
        self._instances: dict[tuple[Any, ...], KernelInstance] = {}

    def __getitem__(self, template_args: Any) -> KernelInstance:
        if not isinstance(template_args, tuple):
            template_args = (template_args,)
        instance = self._instances.get(template_args)
        if instance is None:
            instance = self._instances.setdefault(template_args, KernelInstance(self, template_args))
        return instance

    def load(self, device: torch.device, template_args: tuple[Any, ...]) -> Callable[..., Any]:
        """Compile or load ``entry<template_args>`` for ``device`` and return the function."""
        target = self.target_of(device)
        self.spec.sources_for(device.type)  # fail before compiling for a device without sources
        rendered = render_template_args(template_args, device.type)
        library = cache.load_or_build(self.spec, target, rendered)
        return getattr(tvm_ffi.load_module(str(library)), self.spec.name)


def jit(
    name: str,
    *,
    entry: str,
    cuda_sources: Sequence[str | Path] = (),
    cpu_sources: Sequence[str | Path] = (),
    target_of: Callable[[torch.device], Target] = target_for,
) -> Callable[[Callable[Concatenate[JitKernel, P], R]], Callable[P, R]]:
    """Register a kernel and bind it as the first argument of the decorated wrapper.

    ``entry`` is the C++ function (template) to export; sources are the
    headers defining it per device, relative to the mllm_kernel package or absolute.
    ``target_of`` picks the build target for a device (default: the device's own arch;
    kernels with arch-specific instructions such as wgmma ask for e.g. "9.0a").
    """
    sources: dict[str, list[str | Path]] = {}
    if cuda_sources:
        sources["cuda"] = list(cuda_sources)
    if cpu_sources:
        sources["cpu"] = list(cpu_sources)
    spec = make_spec(name, entry, sources)
    register(spec)
    kernel = JitKernel(spec, target_of)

    def decorate(function: Callable[Concatenate[JitKernel, P], R]) -> Callable[P, R]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            return function(kernel, *args, **kwargs)

        wrapper.kernel = kernel  # type: ignore[attr-defined]
        return wrapper

    return decorate
