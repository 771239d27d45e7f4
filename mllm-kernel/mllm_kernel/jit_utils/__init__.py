"""JIT compilation of mllm_kernel's C++/CUDA kernels through TVM-FFI."""

from mllm_kernel.jit_utils.cache import CACHE_DIR_ENV, cache_root
from mllm_kernel.jit_utils.jit import JitKernel, KernelInstance, jit
from mllm_kernel.jit_utils.parallel_build import BuildStep, build_in_parallel
from mllm_kernel.jit_utils.registry import KernelSpec, registered_kernels
from mllm_kernel.jit_utils.target import CUDA_ARCH_ENV, Target, target_for

__all__ = [
    "BuildStep",
    "CACHE_DIR_ENV",
    "CUDA_ARCH_ENV",
    "JitKernel",
    "KernelInstance",
    "KernelSpec",
    "Target",
    "build_in_parallel",
    "cache_root",
    "jit",
    "registered_kernels",
    "target_for",
]
