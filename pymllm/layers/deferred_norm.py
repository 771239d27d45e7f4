"""A pre-norm block's RMSNorm deferred into the projections on either side of it.

Between two decode GEMVs the RMSNorm is a kernel of its own whose work is tiny: at batch 1 its
launch and its row-wide reduction cost more than the arithmetic (H100, Qwen3-8B W4A16: removing
both norms of every layer shortens the step by ~6 %, run T110 in docs/perf). Since

    W norm(h) = W (w * h / rms(h)) = (W (w * h)) / rms(h),

the projection before the norm (the producer: o_proj, down_proj) can write h = out + residual,
the next projection's input ``w * h`` and partial sums of h^2 from its epilogue, and the
projection after it (the consumer: gate/up, the next layer's qkv) divides its outputs by rms(h),
which it reads from those sums after its own work. Neither side waits for a reduction.

A layer's method offers each side where its kernel can (``LinearMethodBase.apply_add_norm`` /
``apply_normed``, with ``gated`` for the gate/up GEMV's SiLU-and-mul form; W4A16's one-row
GEMV). The producer only defers where the consumer says it will take it
(``takes_deferred_norm``); should the consumer decline after all, ``DeferredNorm.materialize``
runs the norm on h, so the result never depends on it.
``PYMLLM_DEFERRED_NORM=0`` keeps the separate norm kernels (the A/B switch of the measurements).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pymllm.layers.layernorm import RMSNorm

ENV_SWITCH = "PYMLLM_DEFERRED_NORM"


def deferred_norm_enabled() -> bool:
    """False when ``PYMLLM_DEFERRED_NORM=0``: every norm then runs as its own kernel."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


@dataclass
class DeferredNorm:
    """The input of a pre-norm block whose RMSNorm the consumer applies.

    scaled: ``norm.weight * h`` [rows, H] in the activation dtype (the consumer's GEMV input);
    residual: h [rows, H], the residual stream after this block's add;
    sumsq: float32 partial sums of h^2 (any split; their total is sum(h^2) of the row);
    eps: the norm's epsilon.
    """

    scaled: torch.Tensor
    residual: torch.Tensor
    sumsq: torch.Tensor
    eps: float

    def materialize(self, norm: "RMSNorm") -> torch.Tensor:
        """norm(h), as the separate kernel computes it: for a consumer without the fused path."""
        return norm(self.residual)
