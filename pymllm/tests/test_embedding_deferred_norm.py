"""The embedding as the producer of the first layer's deferred RMSNorm
(pymllm.layers.kernels.embedding_norm_triton, dispatched by fused_ops.embedding_deferred_norm).

Oracle: the PyTorch reference (the gathered rows, ``norm_weight * h`` rounded once, the float32
sum of h^2) and, end to end, RMSNorm itself: 1 / rms from the partial sums times the scaled row
equals the norm of the row. On CPU the kernel runs under Triton's interpreter in a child process;
the GPU test runs it on Qwen3-8B's width.
"""

from __future__ import annotations

import pytest
import torch

from pymllm.layers import fused_ops
from pymllm.tests.helpers import assert_passes_under_triton_interpreter


def check_against_reference(device: str, vocab: int, hidden: int, rows: int, dtype: torch.dtype, seed: int) -> None:
    from pymllm.layers.kernels.embedding_norm_triton import embedding_deferred_norm, num_tiles

    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.5).to(dtype=dtype, device=device)
    norm_w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype=dtype, device=device)
    ids = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    scaled, residual, sumsq = embedding_deferred_norm(ids, weight, norm_w)
    want_scaled, want_residual, want_sumsq = fused_ops.embedding_deferred_norm_reference(ids, weight, norm_w)
    assert sumsq.shape == (rows, num_tiles(hidden)) and sumsq.dtype == torch.float32
    torch.testing.assert_close(residual, want_residual, rtol=0, atol=0)
    # Rounded once from the same float32 product: equal on the GPU; Triton's interpreter rounds
    # float32 to 16 bits its own way (within one unit in the last place).
    ulp = 0 if device == "cuda" else (2**-7 if dtype == torch.bfloat16 else 2**-10)
    torch.testing.assert_close(scaled, want_scaled, rtol=ulp, atol=0)
    torch.testing.assert_close(sumsq.sum(-1, keepdim=True), want_sumsq, rtol=1e-5, atol=1e-5)
    # The consumer's side: 1 / rms(h) from the partial sums times the scaled row is RMSNorm(h).
    eps = 1e-6
    normed = scaled.float() * torch.rsqrt(sumsq.sum(-1, keepdim=True) / hidden + eps)
    h = residual.float()
    ref = norm_w.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))
    torch.testing.assert_close(normed, ref, rtol=2e-2, atol=2e-2)


def interpreter_checks() -> None:
    for hidden in (64, 1024, 1500, 2048 + 512):
        for dtype in (torch.bfloat16, torch.float16):
            check_against_reference("cpu", 50, hidden, 3, dtype, seed=hidden)
    print("interpreter checks passed")


def test_kernel_under_interpreter() -> None:
    assert_passes_under_triton_interpreter("pymllm.tests.test_embedding_deferred_norm", "interpreter_checks",
                                           printed="interpreter checks passed")


def test_dispatcher_takes_the_reference_on_cpu() -> None:
    weight = torch.randn(10, 16, dtype=torch.bfloat16)
    norm_w = torch.rand(16, dtype=torch.bfloat16)
    ids = torch.tensor([3, 7])
    got = fused_ops.embedding_deferred_norm(ids, weight, norm_w)
    want = fused_ops.embedding_deferred_norm_reference(ids, weight, norm_w)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(got[1], weight[ids])


def test_argument_errors() -> None:
    pytest.importorskip("triton")
    from pymllm.layers.kernels.embedding_norm_triton import embedding_deferred_norm

    weight, norm_w = torch.zeros(10, 16), torch.zeros(16)
    with pytest.raises(ValueError, match="input_ids"):
        embedding_deferred_norm(torch.zeros(2, 1, dtype=torch.int64), weight, norm_w)
    with pytest.raises(ValueError, match="input_ids"):
        embedding_deferred_norm(torch.zeros(2), weight, norm_w)
    with pytest.raises(ValueError, match="weight"):
        embedding_deferred_norm(torch.zeros(2, dtype=torch.int64), torch.zeros(16, 10).t(), norm_w)
    with pytest.raises(ValueError, match="norm_weight"):
        embedding_deferred_norm(torch.zeros(2, dtype=torch.int64), weight, torch.zeros(8))
    with pytest.raises(ValueError, match="norm_weight"):
        embedding_deferred_norm(torch.zeros(2, dtype=torch.int64), weight, torch.zeros(16, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_reference(rows, dtype) -> None:
    check_against_reference("cuda", 151936, 4096, rows, dtype, seed=rows)
