"""CPU kernel sources (csrc/), served by the same wrappers as the CUDA kernels."""
