"""CUDA kernel sources (csrc/) and their Python wrappers (jit/)."""
