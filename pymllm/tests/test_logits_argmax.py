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
    check_ids_destinations("cpu", counters)
    print("interpreter checks passed")


def check_ids_destinations(device: str, counters=None, pin: bool = False) -> None:
    """``feed`` and ``mirror`` get the same ids as the result, in rows [0, rows) only, and the
    mirror row is the one the slot names when the kernel runs (the slot changes between calls)."""
    from pymllm.layers.kernels.logits_argmax_triton import float_logits_argmax

    rows, vocab = 3, 5000
    feed = torch.full((rows + 2,), -7, dtype=torch.int64, device=device)
    ring = torch.full((4, rows + 3), -7, dtype=torch.int64, pin_memory=pin)
    slot = torch.zeros(1, dtype=torch.int64, device=device)
    for step, row in enumerate((2, 0, 3)):
        x = _cases(device, vocab, rows, torch.bfloat16, seed=step)[:rows].contiguous()
        slot.fill_(row)
        _, ids = float_logits_argmax(x, counters, feed=feed, mirror=(ring, slot))
        if device == "cuda":
            torch.cuda.synchronize()
        want = torch.argmax(x.float().cpu(), dim=-1).tolist()
        assert ids.tolist() == want and feed[:rows].tolist() == want and feed[rows:].tolist() == [-7, -7]
        assert ring[row, :rows].tolist() == want and ring[row, rows:].tolist() == [-7] * 3, (step, row)


def test_kernel_under_interpreter() -> None:
    assert_passes_under_triton_interpreter("pymllm.tests.test_logits_argmax", "interpreter_checks",
                                           printed="interpreter checks passed")


def test_dispatcher_falls_back_on_cpu() -> None:
    x = _cases("cpu", 300, 2, torch.bfloat16, seed=1)
    logits, ids = fused_ops.float_logits_argmax(x)
    torch.testing.assert_close(logits, x.float(), rtol=0, atol=0, equal_nan=True)
    assert ids.tolist() == torch.argmax(x, dim=-1).tolist()


def test_reference_writes_the_ids_destinations() -> None:
    """The CPU fallback (fused_ops' reference) honours feed and mirror as the kernel does."""
    x = _cases("cpu", 300, 2, torch.bfloat16, seed=2)
    feed = torch.zeros(8, dtype=torch.int64)
    ring = torch.zeros(3, 8, dtype=torch.int64)
    _, ids = fused_ops.float_logits_argmax(x, feed=feed, mirror=(ring, torch.tensor([2])))
    n = ids.numel()
    assert feed[:n].tolist() == ids.tolist() == ring[2, :n].tolist() and not ring[:2].any()


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
    with pytest.raises(ValueError, match="feed"):
        float_logits_argmax(torch.zeros(4, 8), feed=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="feed"):
        float_logits_argmax(torch.zeros(4, 8), feed=torch.zeros(4, dtype=torch.int32))
    slot = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="mirror ring"):
        float_logits_argmax(torch.zeros(4, 8), mirror=(torch.zeros(2, 3, dtype=torch.int64), slot))
    with pytest.raises(ValueError, match="mirror ring"):
        float_logits_argmax(torch.zeros(4, 8), mirror=(torch.zeros(8, dtype=torch.int64), slot))
    with pytest.raises(ValueError, match="mirror slot"):
        float_logits_argmax(torch.zeros(4, 8), mirror=(torch.zeros(2, 4, dtype=torch.int64),
                                                       torch.zeros(2, dtype=torch.int64)))


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


@pytest.mark.gpu
def test_gpu_ids_destinations() -> None:
    """The ids reach a pinned host ring row straight from the kernel (and the feed buffer)."""
    from pymllm.layers.kernels.logits_argmax_triton import arrival_counters

    check_ids_destinations("cuda", arrival_counters(8, "cuda"), pin=True)


@pytest.mark.gpu
def test_gpu_graph_replays_write_the_slot_of_each_replay() -> None:
    """Captured once, replayed with a new slot each time: each replay's ids land in the pinned
    row its slot names when it runs, the rows of earlier replays untouched."""
    from pymllm.layers.kernels.logits_argmax_triton import arrival_counters, float_logits_argmax

    rows, vocab = 2, 151936
    x = torch.zeros(rows, vocab, dtype=torch.bfloat16, device="cuda")
    counters = arrival_counters(rows, "cuda")
    feed = torch.zeros(rows, dtype=torch.int64, device="cuda")
    ring = torch.full((4, rows), -1, dtype=torch.int64, pin_memory=True)
    slot = torch.zeros(1, dtype=torch.int64, device="cuda")
    float_logits_argmax(x, counters, feed=feed, mirror=(ring, slot))  # compile outside the capture
    torch.cuda.synchronize()
    ring.fill_(-1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        float_logits_argmax(x, counters, feed=feed, mirror=(ring, slot))
    wanted = {}
    for step, row in enumerate((1, 2, 3)):
        x.zero_()
        x[0, 1000 * step + 5] = 1.0
        x[1, 77 + step] = 2.0
        slot.fill_(row)
        graph.replay()
        wanted[row] = [1000 * step + 5, 77 + step]
    torch.cuda.synchronize()
    for row, want in wanted.items():
        assert ring[row].tolist() == want
    assert ring[0].tolist() == [-1, -1] and feed.tolist() == wanted[3]
