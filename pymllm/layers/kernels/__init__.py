"""Device kernels behind the dispatchers in pymllm.layers.fused_ops and the attention backends.

The *_triton modules import Triton when they are imported; the dispatchers import them only
after their capability check passed, so CPU-only processes never load Triton.
"""
