"""The decode step's tail kernel: float32 logits and their argmax in one launch
(pymllm.layers.kernels.logits_argmax_triton, dispatched by fused_ops.float_logits_argmax).

Oracle: ``logits.float()`` and ``torch.argmax`` on the same rows. On CPU the kernel runs under
Triton's interpreter in a child process (TRITON_INTERPRET is read when a kernel is defined); the
GPU tests (marked gpu) run it on Qwen3's vocabulary, also captured in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from pymllm.layers import fused_ops
from pymllm.tests.helpers import assert_passes_under_triton_interpreter


def _cases(device: str, vocab: int, rows: int, dtype: torch.dtype, seed: int):
    """Random rows plus rows that probe the tie and edge rules: the maximum twice in different
    blocks (the first wins), the maximum in the last, partial block, a row of -inf only (index
    0), and a NaN (ranks first, as in torch)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows + 4, vocab, generator=gen) * 3
    x[rows, 17] = x[rows, vocab - 3] = 100.0
    x[rows + 1, vocab - 1] = 50.0
    x[rows + 2] = float("-inf")
    x[rows + 3, vocab // 2] = float("nan")
    return x.to(dtype=dtype, device=device)


def check_against_torch(device: str, vocab: int, rows: int, dtype: torch.dtype, seed: int = 0,
                        counters=None) -> None:
    from pymllm.layers.kernels import logits_argmax_triton

    x = _cases(device, vocab, rows, dtype, seed)
    for _ in range(2):  # the second call reuses the counters the first left at zero
        got_logits, got_ids = logits_argmax_triton.float_logits_argmax(x, counters)
        torch.testing.assert_close(got_logits, x.float(), rtol=0, atol=0, equal_nan=True)
        assert got_ids.dtype == torch.int64
        assert got_ids.tolist() == torch.argmax(x.float().cpu(), dim=-1).tolist(), (vocab, rows, dtype)
    if counters is not None:
        assert int(counters.abs().sum()) == 0, "arrival counters must be left at zero"


def interpreter_checks() -> None:
    from pymllm.layers.kernels.logits_argmax_triton import BLOCK, arrival_counters

    counters = arrival_counters(16, "cpu")
    for vocab in (BLOCK, BLOCK + 1, 3 * BLOCK - 5, 1000):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            check_against_torch("cpu", vocab, 3, dtype, seed=vocab, counters=counters)
    # Strided rows (a slice of a wider buffer) and no counters passed.
    wide = torch.randn(4, 2 * BLOCK + 64).to(torch.bfloat16)
    from pymllm.layers.kernels.logits_argmax_triton import float_logits_argmax

    logits, ids = float_logits_argmax(wide[:, : 2 * BLOCK + 7])
    assert ids.tolist() == torch.argmax(wide[:, : 2 * BLOCK + 7].float(), dim=-1).tolist()
    torch.testing.assert_close(logits, wide[:, : 2 * BLOCK + 7].float(), rtol=0, atol=0)
    print("interpreter checks passed")


def test_kernel_under_interpreter() -> None:
    assert_passes_under_triton_interpreter("pymllm.tests.test_logits_argmax", "interpreter_checks",
                                           printed="interpreter checks passed")


def test_dispatcher_falls_back_on_cpu() -> None:
    x = _cases("cpu", 300, 2, torch.bfloat16, seed=1)
    logits, ids = fused_ops.float_logits_argmax(x)
    torch.testing.assert_close(logits, x.float(), rtol=0, atol=0, equal_nan=True)
    assert ids.tolist() == torch.argmax(x, dim=-1).tolist()


def test_argument_errors() -> None:
    pytest.importorskip("triton")
    from pymllm.layers.kernels.logits_argmax_triton import float_logits_argmax

    with pytest.raises(ValueError, match="rows, vocab"):
        float_logits_argmax(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="dense in vocab"):
        float_logits_argmax(torch.zeros(8, 4).t())
    with pytest.raises(ValueError, match="counters"):
        float_logits_argmax(torch.zeros(4, 8), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="counters"):
        float_logits_argmax(torch.zeros(4, 8), torch.zeros(4, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_torch(rows, dtype) -> None:
    from pymllm.layers.kernels.logits_argmax_triton import arrival_counters

    check_against_torch("cuda", 151936, rows, dtype, seed=rows, counters=arrival_counters(rows + 4, "cuda"))


@pytest.mark.gpu
def test_gpu_graph_replays_follow_new_logits() -> None:
    from pymllm.layers.kernels.logits_argmax_triton import arrival_counters

    rows, vocab = 4, 151936
    x = torch.empty(rows, vocab, dtype=torch.bfloat16, device="cuda")
    counters = arrival_counters(rows, "cuda")
    x.normal_()
    fused_ops.float_logits_argmax(x, counters)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits, ids = fused_ops.float_logits_argmax(x, counters)
    for seed in range(3):
        torch.manual_seed(seed)
        x.normal_()
        logits.fill_(float("nan"))
        ids.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        assert ids.tolist() == torch.argmax(x, dim=-1).tolist()
        torch.testing.assert_close(logits, x.float(), rtol=0, atol=0)
