"""Decode-sized matmuls: mllm_kernel's weight-streaming GEMV where it measures faster, else the GEMM.

A decode step multiplies 1..8 activation rows by every weight matrix, so it is bound by reading
the weights. Whether mllm_kernel's ``gemv`` / ``gemv_w8a8`` beat cuBLAS / CUTLASS depends on the
shape and the GPU (on an H200, bench_gemv.py: 3.9x on Qwen3-0.6B's o_proj at one row, 1.1x on
the LM heads, level with cuBLAS on Qwen3-8B's gate_up and down), so the choice is measured,
once per (device, dtype, kind, N, K, rows), the first time that combination runs outside a
CUDA-graph capture: both candidates are captured in a small graph over enough copies of the
weight to miss L2, as in a decode step, and the GEMV must be at least 3% faster to be chosen.
The CUDA-graph runner's warm-up pass runs each captured batch size eagerly first, so every
decision exists before capture; a combination first seen inside a capture takes the GEMM.

The plain GEMVs come in several compiled tilings (weight rows per warp, split K or not); the
same measurement times each and keeps the fastest for the key, since which one streams fastest
depends on the shape and the GPU.

The GEMV also needs: a CUDA device of SM80 or newer, at most ``GEMV_MAX_ROWS`` rows, the
layouts its 16-byte loads need, and a one-time self-test of the compiled kernel against its
PyTorch reference (``prepare_gemv``, run while the model loads so the JIT build never lands in
a request). Everything else takes the PyTorch / GEMM path.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

GEMV_MAX_ROWS = 8
GEMV_MIN_SPEEDUP = 1.03  # the GEMV must beat the GEMM by this factor to be chosen
_L2_DEFEAT_BYTES = 64 << 20  # weight copies per candidate graph add up to at least this
_CALLS_PER_GRAPH = 8
_ACT_DTYPES = (torch.float16, torch.bfloat16)

ChoiceKey = Tuple[str, torch.device, torch.dtype, int, int, int]  # (kind, device, dtype, N, K, rows)


def gemv_layout_ok(x: torch.Tensor, weight: torch.Tensor, k_multiple: int) -> bool:
    """The shape/layout conditions of the kernels' 16-byte vector loads."""
    k = weight.shape[-1]
    return (
        x.dim() == 2
        and 1 <= x.shape[0] <= GEMV_MAX_ROWS
        and x.shape[1] == k
        and k % k_multiple == 0
        and weight.is_contiguous()
        and x.stride(1) == 1
        and (x.stride(0) * x.element_size()) % 16 == 0
        and x.data_ptr() % 16 == 0
        and weight.data_ptr() % 16 == 0
    )


def _self_test(kind: str, device: torch.device, dtype: torch.dtype) -> None:
    from mllm_kernel.cuda.jit import gemv_kernels as kernels

    gen = torch.Generator(device="cpu").manual_seed(0)
    bias = torch.randn(96, generator=gen).to(device=device, dtype=dtype)
    if kind == "dense":
        x = torch.randn(3, 512, generator=gen).to(device=device, dtype=dtype)
        w = (torch.randn(96, 512, generator=gen) / 16).to(device=device, dtype=dtype)
        got, want = kernels.gemv(x, w, bias), kernels.gemv_reference(x, w, bias)
        ok = bool(((got.float() - want.float()).abs() <= 2.0**-6 * (want.float().abs() + 1)).all())
    else:
        x = torch.randint(-128, 128, (3, 512), generator=gen, dtype=torch.int8).to(device)
        x_scale = (torch.rand(3, 1, generator=gen) / 100).to(device)
        w = torch.randint(-128, 128, (96, 512), generator=gen, dtype=torch.int8).to(device)
        w_scale = (torch.rand(96, generator=gen) / 100).to(device)
        got = kernels.gemv_w8a8(x, x_scale, w, w_scale, dtype, bias)
        ok = torch.equal(got, kernels.gemv_w8a8_reference(x, x_scale, w, w_scale, dtype, bias))
    if not ok:
        raise RuntimeError("results differ from the PyTorch reference")


# (kind, device, dtype) -> whether that kernel built and agreed with its reference there.
_ready: Dict[Tuple[str, torch.device, torch.dtype], bool] = {}


def decode_kernels_run_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether mllm_kernel's decode kernels (GEMVs, their fused forms) exist for this device and
    activation dtype: CUDA SM80+, fp16 / bf16."""
    # Imported here: pymllm.quantization's schemes import this module.
    from pymllm.quantization.kernels.device import cuda_capability

    return device.type == "cuda" and cuda_capability(device) >= (8, 0) and dtype in _ACT_DTYPES


def prepare_kernel(kind: str, device: torch.device, dtype: torch.dtype, self_test: Callable[[], None]) -> bool:
    """Build (or load from mllm_kernel's cache) and self-test a decode kernel once per
    (kind, device, dtype): ``self_test`` runs it against its PyTorch reference and raises on a
    mismatch. Call it while the model loads, so the JIT build never lands in a request or a
    CUDA-graph capture. False, with a warning, when the kernel cannot be used here."""
    key = (kind, device, dtype)
    ready = _ready.get(key)  # the per-call path: one lookup once prepared
    if ready is not None:
        return ready
    if not decode_kernels_run_on(device, dtype):
        _ready[key] = False
        return False
    if torch.cuda.is_current_stream_capturing():
        return False  # no build or self-test inside a capture; not cached, so a later eager call prepares
    start = time.perf_counter()
    logger.info("Preparing the %s kernel for %s (first use compiles it; later starts load the cache)", kind, dtype)
    try:
        self_test()
    except Exception as error:  # import, compile or mismatch: fall back, never fail the load
        logger.warning("%s kernel unavailable on %s (%s); the PyTorch / GEMM path runs instead", kind, device, error)
        _ready[key] = False
        return False
    logger.info("%s kernel ready in %.1f s", kind, time.perf_counter() - start)
    _ready[key] = True
    return True


def prepare_gemv(kind: str, device: torch.device, dtype: torch.dtype) -> bool:
    """``prepare_kernel`` for the "dense" (``gemv``) or "w8a8" (``gemv_w8a8``) GEMV."""
    return prepare_kernel(f"{kind} GEMV", device, dtype, lambda: _self_test(kind, device, dtype))


def graph_seconds_per_call(calls) -> float:
    """Best of three replays of one graph running ``calls`` back to back, per call: GPU time as
    a captured decode step sees it (no launch overhead between the calls)."""
    for call in calls:
        call()  # warm-up: cuBLAS heuristics, lazily built state
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e-3 / len(calls))
    return best


def tiling_of(impl: str) -> int:
    """The GEMV tiling a candidate name carries ("gemv:14" -> 14; plain "gemv" -> 0, the kernel's choice)."""
    return int(impl.partition(":")[2] or 0)


class GemvChooser:
    """Measured GEMV-or-GEMM decisions, one per ChoiceKey (see the module docstring), and for
    the plain GEMVs the fastest of their compiled tilings."""

    def __init__(self, timer: Callable[[str, list], float] = lambda impl, calls: graph_seconds_per_call(calls)):
        self._timer = timer
        self.choices: Dict[ChoiceKey, bool] = {}
        self.tilings: Dict[ChoiceKey, int] = {}  # the measured GEMV tiling of a key (0 when not measured)

    def tiling(self, key: ChoiceKey) -> int:
        return self.tilings.get(key, 0)

    def use_gemv(self, key: ChoiceKey, weight: torch.Tensor, make_calls: Callable[[str, torch.Tensor], Callable],
                 labels: Tuple[str, str] = ("GEMV", "GEMM"), tilings: Sequence[int] = ()) -> bool:
        """Whether to run the GEMV for ``key``; measures on first use outside a capture.

        make_calls(impl, weight) returns a zero-argument call of ``impl`` on that weight with the
        caller's activations: "gemm", and "gemv", or with ``tilings`` one "gemv:<tiling>" per
        tiling, of which the fastest stands for the GEMV (and is kept: ``tiling(key)``). Which
        tiling streams fastest depends on the shape and the GPU (warps in flight against waves),
        so it is measured like the GEMV-or-GEMM choice. ``labels`` name the two sides in the log
        (the fused GEMVs compare "fused" against "separate" kernels the same way).
        """
        choice = self.choices.get(key)
        if choice is not None:
            return choice
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return False  # never measure inside someone else's capture
        copies = [weight]
        weight_bytes = weight.numel() * weight.element_size()
        while len(copies) * weight_bytes < _L2_DEFEAT_BYTES and len(copies) < _CALLS_PER_GRAPH:
            copies.append(weight.clone())
        reps = max(1, _CALLS_PER_GRAPH // len(copies))
        candidates = [f"gemv:{t}" for t in tilings] or ["gemv"]
        times = {
            impl: self._timer(impl, [make_calls(impl, w) for w in copies] * reps) for impl in (*candidates, "gemm")
        }
        best = min(candidates, key=times.__getitem__)
        choice = times["gemm"] >= GEMV_MIN_SPEEDUP * times[best]
        self.choices[key] = choice
        if tilings:
            self.tilings[key] = tiling_of(best)
        detail = ""
        if len(candidates) > 1:
            detail = " (tiling %d; %s)" % (tiling_of(best), ", ".join(
                f"{tiling_of(c)}: {times[c] * 1e6:.1f}" for c in candidates))
        logger.info(
            "measured matmul %s N=%d K=%d rows=%d: %s %.1f us%s, %s %.1f us -> %s",
            key[0], key[3], key[4], key[5], labels[0], times[best] * 1e6, detail, labels[1], times["gemm"] * 1e6,
            labels[0] if choice else labels[1],
        )
        return choice


CHOOSER = GemvChooser()


def choice_key(kind: str, x2d: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> ChoiceKey:
    """The decision's key: (kind, device, dtype, N, K, rows) of x2d [rows, K] times weight [N, K]."""
    return (kind, x2d.device, dtype, weight.shape[0], weight.shape[1], x2d.shape[0])


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the GEMV for decode-sized inputs where it is faster."""
    x2d = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if (
        x2d.shape[0] <= GEMV_MAX_ROWS
        and x.is_cuda
        and weight.dtype == x.dtype
        and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
        and gemv_layout_ok(x2d, weight, 8)
        and prepare_gemv("dense", x.device, x.dtype)
    ):
        from mllm_kernel.cuda.jit.gemv_kernels import TILINGS, gemv

        def make_call(impl: str, w: torch.Tensor) -> Callable:
            if impl == "gemm":
                return lambda: F.linear(x2d, w, bias)
            return lambda: gemv(x2d, w, bias, _tiling=tiling_of(impl))

        key = choice_key("dense", x2d, weight, x.dtype)
        if CHOOSER.use_gemv(key, weight, make_call, tilings=TILINGS):
            return gemv(x2d, weight, bias, _tiling=CHOOSER.tiling(key)).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def w8a8_gemv_or_none(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight_nk: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: Optional[torch.Tensor],
    gemm: Callable[[torch.Tensor], torch.Tensor],
) -> Optional[torch.Tensor]:
    """The W8A8 product through ``gemv_w8a8`` when it serves these inputs and measures faster
    than ``gemm(weight_nk)`` (the caller's int8 GEMM); None when the caller should run the GEMM."""
    if not (
        x_q.is_cuda
        and x_q.dim() == 2
        and x_q.shape[0] <= GEMV_MAX_ROWS
        and weight_nk.dtype == torch.int8
        and (bias is None or (bias.dtype == out_dtype and bias.is_contiguous()))
        and x_scale.is_contiguous()
        and gemv_layout_ok(x_q, weight_nk, 16)
        and prepare_gemv("w8a8", x_q.device, out_dtype)
    ):
        return None
    from mllm_kernel.cuda.jit.gemv_kernels import TILINGS, gemv_w8a8

    def make_call(impl: str, w: torch.Tensor) -> Callable:
        if impl == "gemm":
            return lambda: gemm(w)
        return lambda: gemv_w8a8(x_q, x_scale, w, w_scale, out_dtype, bias, _tiling=tiling_of(impl))

    key = choice_key("w8a8", x_q, weight_nk, out_dtype)
    if CHOOSER.use_gemv(key, weight_nk, make_call, tilings=TILINGS):
        return gemv_w8a8(x_q, x_scale, weight_nk, w_scale, out_dtype, bias, _tiling=CHOOSER.tiling(key))
    return None
