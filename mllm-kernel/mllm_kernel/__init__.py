"""mllm_kernel: CPU/CUDA kernels for pymllm, compiled on first use through TVM-FFI."""

__version__ = "0.1.0"

from mllm_kernel.cuda.jit import *  # noqa: F401,F403  (the kernels and their references)
from mllm_kernel.cuda.jit import __all__ as _kernels

__all__ = ["__version__", *_kernels]
