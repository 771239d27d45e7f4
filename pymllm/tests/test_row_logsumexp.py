"""Row-wise logsumexp in one pass (pymllm.layers.kernels.logsumexp_triton, dispatched by
fused_ops.row_logsumexp), the normaliser of prompt scoring's log_softmax.

Oracle: ``torch.logsumexp`` in float64 of the same rows. On CPU the kernel runs under Triton's
interpreter in a child process; the GPU tests (marked gpu) run it on Qwen3's vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from pymllm.layers import fused_ops
from pymllm.tests.helpers import assert_passes_under_triton_interpreter


def _rows(device: str, vocab: int, rows: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows at logit scale, plus a row with one dominant entry in the last (partial)
    block, a row of -inf but one entry, and a row of -inf only (logsumexp -inf)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows + 3, vocab, generator=gen) * 4
    x[rows, vocab - 1] = 60.0
    x[rows + 1] = float("-inf")
    x[rows + 1, vocab // 3] = 2.5
    x[rows + 2] = float("-inf")
    return x.to(dtype=dtype, device=device)


def check_against_torch(device: str, vocab: int, rows: int, dtype: torch.dtype, seed: int = 0) -> None:
    from pymllm.layers.kernels.logsumexp_triton import row_logsumexp

    x = _rows(device, vocab, rows, dtype, seed)
    got = row_logsumexp(x)
    assert got.dtype == torch.float32 and got.shape == (rows + 3,)
    want = torch.logsumexp(x.double(), dim=-1).float()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def interpreter_checks() -> None:
    from pymllm.layers.kernels.logsumexp_triton import BLOCK, row_logsumexp

    for vocab in (BLOCK, BLOCK + 1, 3 * BLOCK - 5, 1000):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            check_against_torch("cpu", vocab, 3, dtype, seed=vocab)
    # Strided rows (the LM head's output sliced from a wider buffer).
    wide = torch.randn(4, 2 * BLOCK + 64).to(torch.bfloat16)
    torch.testing.assert_close(row_logsumexp(wide[:, : 2 * BLOCK + 7]),
                               torch.logsumexp(wide[:, : 2 * BLOCK + 7].double(), -1).float(), rtol=1e-6, atol=1e-5)
    print("interpreter checks passed")


def test_kernel_under_interpreter() -> None:
    assert_passes_under_triton_interpreter("pymllm.tests.test_row_logsumexp", "interpreter_checks",
                                           printed="interpreter checks passed")


def test_dispatcher_falls_back_on_cpu() -> None:
    x = _rows("cpu", 300, 2, torch.bfloat16, seed=1)
    torch.testing.assert_close(fused_ops.row_logsumexp(x), torch.logsumexp(x.float(), -1))


def test_argument_errors() -> None:
    pytest.importorskip("triton")
    from pymllm.layers.kernels.logsumexp_triton import row_logsumexp

    with pytest.raises(ValueError, match="rows, vocab"):
        row_logsumexp(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="dense in vocab"):
        row_logsumexp(torch.zeros(8, 4).t())


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_torch(rows, dtype) -> None:
    check_against_torch("cuda", 151936, rows, dtype, seed=rows)
    x = _rows("cuda", 4096, rows, dtype, seed=rows + 1)  # and through the dispatcher, float32 included
    torch.testing.assert_close(fused_ops.row_logsumexp(x), torch.logsumexp(x.double(), -1).float(),
                               rtol=1e-6, atol=1e-5)
