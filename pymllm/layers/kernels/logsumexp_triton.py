"""Row-wise logsumexp of model-dtype logits in one pass, in float32: what scoring a prompt needs.

``torch.logsumexp(logits.float(), -1)`` casts a float32 copy, then takes a max, subtracts it,
exponentiates, sums and adds back: five passes over the rows. Scoring a 2,048-token prompt of
Qwen3-8B on an H100 spent 6 of its 9 ms there and 4 ms in the LM head's GEMM itself (T158).
Here one program per row streams the row once in blocks, keeping a running maximum and a
rescaled running sum per lane (the online softmax's normaliser), and merges the lanes at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # elements per iteration: 16 per thread at 4 warps
NUM_WARPS = 4


@triton.jit
def _row_logsumexp_kernel(x_ptr, out_ptr, vocab, x_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * x_stride
    lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(lane_max, x)
        # A lane that has seen only -inf keeps a zero sum (exp(-inf - -inf) would be NaN).
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - safe) + tl.exp(x - safe)
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.sum(lane_sum * tl.exp(lane_max - safe_max), axis=0)
    tl.store(out_ptr + row, safe_max + tl.log(total))


def row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """float32 logsumexp of each row of ``logits`` [rows, vocab] (dense in vocab)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"row_logsumexp: logits must be [rows, vocab] dense in vocab, got {tuple(logits.shape)}")
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _row_logsumexp_kernel[(rows,)](logits, out, vocab, logits.stride(0), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out
