"""w4a16_gemv: decode GEMM (M = 1..64 rows) with 4-bit weights in pymllm's W4A16 runtime layout.

    out [M, N] = x [M, K] @ W (+ bias),   W[k, n] = (q[k, n] - 8 - zeros[k // G, n]) * scales[k // G, n]

qweight [K/8, N] int32 holds q[8j + i, n] (unsigned 0..15) in bits 4i..4i+3 of word (j, n);
scales and zeros are [K/G, N] in x's dtype (fp16/bf16); G is a power of two >= 32 dividing K,
or K itself (channel-wise). CUDA only (tensor-core MMA, SM80+; the caller checks the GPU).

Split K runs in the same launch: fp32 partials go to a workspace allocated once per device
(``workspace``; the first call must happen outside CUDA graph capture) and the last block of
each column tile reduces them and resets its counter, so replays of a captured graph work.
Launches on one device share the workspace, so they must be ordered (one stream), as pymllm's
forward is. On SM90+ the kernel launches as a programmatic dependent (mllm_kernel.pdl): its
blocks may be resident before the previous kernel ends and wait for it before reading anything.

One activation row (a decode step at batch 1) runs a second kernel by default: the same
arithmetic with the weights streamed through shared memory by cp.async (w4a16_gemv_one_row.cuh),
in blocks of 8 or 16 warps (``plan_one_row``), its first weights copied before that wait; at
2..64 rows the register kernel runs.

Deferred RMSNorm (one row): a pre-norm block's RMSNorm between two of these GEMVs can run without
a kernel of its own. ``W norm(h) = W (w * h) / rms(h)``, so the producer (``w4a16_gemv_add_norm``)
writes h = out + residual, the next GEMV's input ``w * h`` and per-tile sums of h^2 from its
epilogue, and the consumer (``w4a16_gemv_normed``) scales its outputs by 1 / rms(h) from those
sums, read after its k loop. Roundings: h as the fused add + RMSNorm kernel rounds it, ``w * h``
rounded once; the norm's own rounding of h / rms(h) moves to the consumer's output.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from mllm_kernel.jit_utils import BuildStep, JitKernel, jit
from mllm_kernel.pdl import use_pdl

_OP = "w4a16_gemv"
MAX_M = 64
NARROW_MAX_M = 8  # rows per MMA group; more rows run in the wide kernel (two groups, one weight pass)
WIDE_ROWS = 16  # rows per block of the wide kernel; more rows take chunks of 16 in neighbouring blocks
ACT_DTYPES = (torch.float16, torch.bfloat16)
# Mirrors of the kernel's tiling (w4a16_gemv_kernel.cuh); the C++ side re-checks the workspace bounds.
TILE_N = 64  # columns per block
BATCH_ROWS = 16  # packed rows (8 k each) a warp loads at once
WARPS = 4
BLOCKS_PER_SM = 4  # __launch_bounds__ minimum: 128 registers, 16 warps per SM
HEAVY_BLOCKS_PER_SM = 3  # __launch_bounds__ minimum of the wide and the rolling (gated) kernels: 168 registers
# Batches ahead each warp prefetches into L2 (kernel argument, so benchmarks can compare).
PREFETCH_BATCHES = 1
# The one-row kernel (w4a16_gemv_one_row.cuh): block sizes in warps, columns per block (narrow
# 32-column tiles: 16-warp blocks only) and packed rows per warp batch of each.
ONE_ROW_WARPS = (8, 16)
NARROW_TILE_N = 32
ONE_ROW_TILES = (TILE_N, NARROW_TILE_N)


def one_row_batch_rows(tile_n: int = TILE_N) -> int:
    """Packed rows of a warp's batch in the one-row kernel: 2 KiB of weights at either tile width."""
    return 8 * TILE_N // tile_n
# A launch whose grid fits in one wave lets the next kernel launch (PDL) at its start rather than
# after its k loop: the early blocks then take no slot of its own (the C++ entry checks the wave).
# Measured in the decode graph (H200, processes alternating): Qwen3-8B W4A16 bs1 in1024 (the
# one-row kernel, run T82) graph 2.036 ms against 2.084-2.088, step 2.062-2.068 against
# 2.117-2.178.
EARLY_DEPENDENTS = True
# Workspace: fp32 partials of (tiles x splits x M x TILE_N) and one counter per tile.
WORKSPACE_FLOATS = 1 << 21  # 8 MiB: gate_up's 384 tiles x 3 splits x 16 rows x 64 columns fit
MAX_TILES = 8192  # counters (int32)
MAX_NORM_TILES = 128  # a consumer reads at most this many producer tile sums (kNormLoadsPerLane x 32)


def argument_problem(x, qweight, scales, zeros, group, bias, out, gated=False,
             max_m: Optional[int] = MAX_M) -> Optional[Tuple[type, str]]:
    """The first reason these arguments cannot run, as (exception type, message), or None;
    ``max_m`` None: any number of rows (w4a16_gemm's check)."""
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            return TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}"
    if x.dtype not in ACT_DTYPES:
        return TypeError, f"x must be float16 or bfloat16, got {x.dtype}"
    if x.dim() != 2:
        return ValueError, f"x must be 2-D [M, K], got shape {tuple(x.shape)}"
    m, k = x.shape
    if m < 1 or (max_m is not None and m > max_m):
        rows = f"1..{max_m}" if max_m is not None else "at least 1"
        return ValueError, f"x must have {rows} rows (M), got {m}"
    if k <= 0 or k % 8:
        return ValueError, f"K (x.shape[1] = {k}) must be a positive multiple of 8"
    if x.stride(1) != 1 or (m > 1 and x.stride(0) % 8) or x.data_ptr() % 16:
        return ValueError, (f"x needs unit column stride, a row stride that is a multiple of 8 elements and a "
                            f"16-byte aligned start; got strides {x.stride()}")
    if qweight.dtype != torch.int32:
        return TypeError, f"qweight must be int32, got {qweight.dtype}"
    if qweight.dim() != 2 or qweight.shape[0] != k // 8:
        return ValueError, f"qweight must be [K/8, N] = [{k // 8}, N], got shape {tuple(qweight.shape)}"
    n = qweight.shape[1]
    if gated and n % 8:
        return ValueError, f"gated: N (qweight.shape[1] = {n}) must be a multiple of 8 (gate and up halves of a multiple of 4 each)"
    if n % 4:
        return ValueError, f"N (qweight.shape[1] = {n}) must be a multiple of 4"
    if not qweight.is_contiguous() or qweight.data_ptr() % 16:
        return ValueError, "qweight must be contiguous and 16-byte aligned"
    if isinstance(group, bool) or not isinstance(group, int):
        return TypeError, f"group must be an int, got {type(group).__name__}"
    if group != k and not (group >= 32 and group & (group - 1) == 0 and k % group == 0):
        return ValueError, f"group ({group}) must be K ({k}) or a power of two >= 32 dividing K"
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            return TypeError, f"{name} must be a torch.Tensor or None, got {type(t).__name__}"
        if t.dtype != x.dtype:
            return TypeError, f"{name} must have x's dtype {x.dtype}, got {t.dtype}"
        if t.shape != (k // group, n):
            return ValueError, f"{name} must be [K/G, N] = [{k // group}, {n}], got shape {tuple(t.shape)}"
        if not t.is_contiguous() or t.data_ptr() % 8:
            return ValueError, f"{name} must be contiguous and 8-byte aligned"
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            return TypeError, f"bias must be a torch.Tensor or None, got {type(bias).__name__}"
        if bias.dtype != x.dtype:
            return TypeError, f"bias must have x's dtype {x.dtype}, got {bias.dtype}"
        if bias.shape != (n,) or not bias.is_contiguous():
            return ValueError, f"bias must be a contiguous [N] = [{n}] tensor, got shape {tuple(bias.shape)}"
    if out is not None:
        n_out = n // 2 if gated else n
        if not isinstance(out, torch.Tensor) or out.dtype != x.dtype:
            return TypeError, f"out must be a tensor of x's dtype {x.dtype}"
        if out.shape != (m, n_out) or not out.is_contiguous():
            return ValueError, (f"out must be a contiguous [M, {'N/2' if gated else 'N'}] = [{m}, {n_out}] tensor, "
                                f"got shape {tuple(out.shape)}")
    tensors = {"x": x, "qweight": qweight, "scales": scales, "zeros": zeros, "bias": bias, "out": out}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            return ValueError, f"{name} is on {t.device} but x is on {x.device}"
    if x.device.type != "cuda":
        return ValueError, f"CUDA only, got tensors on {x.device}; use w4a16_gemv_reference"
    return None


def check_arguments(x, qweight, scales, zeros, group, bias=None, out=None, gated=False) -> None:
    """Raise TypeError/ValueError naming the first argument w4a16_gemv cannot take."""
    problem = argument_problem(x, qweight, scales, zeros, group, bias, out, gated)
    if problem is not None:
        error, message = problem
        raise error(f"{_OP}: {message}")


def supported(x, qweight, scales, zeros, group, bias=None, gated=False) -> bool:
    """Whether w4a16_gemv takes these arguments (the dispatcher's shape/layout test)."""
    return argument_problem(x, qweight, scales, zeros, group, bias, None, gated) is None


# plan_splits' cost model: a warp's batch of weight loads, the bytes in flight per SM that saturate
# its share of HBM (H200: ~4.2 TB/s over 132 SMs, ~32 B/ns each; 64 KiB reproduces the best splits
# measured in run T12b: qkv 4-5, o 8, gate_up 1, down 8 at one row), and the split-K round trip.
_WARP_BATCH_BYTES = BATCH_ROWS * TILE_N * 4  # one int32 word per packed row and column of the tile
_SATURATING_BYTES = 64 << 10
_SM_SHARE_BYTES_PER_NS = 32
_BATCH_NS = _WARP_BATCH_BYTES / _SM_SHARE_BYTES_PER_NS
_SPLIT_COST_NS = 1000.0


def partial_rows(m: int) -> int:
    """Rows of fp32 partials a launch of m rows reserves per (tile, row chunk, split): the wide
    kernel's stride is WIDE_ROWS (w4a16_gemv.cuh's partial_rows)."""
    return WIDE_ROWS if m > NARROW_MAX_M else m


def row_chunks(m: int) -> int:
    """Blocks per column tile and split: chunks of WIDE_ROWS rows in the wide kernel."""
    return math.ceil(m / WIDE_ROWS) if m > NARROW_MAX_M else 1


def blocks_per_sm_for(m: int) -> int:
    """Resident blocks per SM that plan_splits assumes for m rows: the wide kernel takes more
    registers. A gated launch (whose narrow kernel also runs 3 blocks per SM) is planned as the
    plain launch of the same weight, so that it sums in the same split order and equals the plain
    GEMV followed by the SiLU-and-mul bit for bit; Qwen3-8B's gate/up runs unsplit either way."""
    return HEAVY_BLOCKS_PER_SM if m > NARROW_MAX_M else BLOCKS_PER_SM


def plan_splits(m: int, n: int, k: int, sm_count: int) -> int:
    """K chunks per column tile, from a small cost model of the busiest SM.

    Time ~ (blocks on the busiest SM) x (batches per block) / (the fraction of its share of HBM
    bandwidth the SM can pull, saturating at ~64 KiB of weight loads in flight, which cover HBM
    latency at the per-SM share) + a per-block overhead + (when split) a fixed cost for the
    partial round trip and the last block's reduction, among the split counts whose blocks fit in
    one wave (SMs x blocks_per_sm_for(m)). The constants are estimates;
    ``bench_w4a16_gemv.py --sweep`` measures the alternatives. Few column tiles (N = 4096: 64)
    need splits to occupy the GPU, many (N = 24576: 384) none.
    """
    blocks_per_sm = blocks_per_sm_for(m)
    n_tiles = math.ceil(n / TILE_N) * row_chunks(m)  # (tile, row chunk) pairs
    batches = math.ceil(k / 8 / BATCH_ROWS)
    best, best_cost = 1, math.inf
    for splits in range(1, batches + 1):
        chunk = math.ceil(batches / splits)
        if math.ceil(batches / chunk) != splits:
            continue  # same chunking as a smaller split count
        if splits > 1 and (n_tiles > MAX_TILES or n_tiles * splits * partial_rows(m) * TILE_N > WORKSPACE_FLOATS):
            break
        blocks = n_tiles * splits
        if splits > 1 and blocks > sm_count * blocks_per_sm:
            # Past one wave of resident blocks the last wave runs nearly empty: measured on an
            # H200 (w4a16_gemv_h200.jsonl, kind "sweep"), gate_up's 384 tiles take 19.5 us
            # unsplit against 22.5 us in 768 blocks, qkv 8.5 us in 384 blocks against 9.9 us in 768.
            break
        per_sm = math.ceil(blocks / sm_count)
        busy_warps = min(per_sm, blocks_per_sm) * min(WARPS, chunk)
        rate = min(1.0, busy_warps * _WARP_BATCH_BYTES / _SATURATING_BYTES)
        # Each block also pays a prologue and the shared-memory reduction (~half a batch).
        cost = per_sm * chunk / rate + 0.5 * per_sm
        if splits > 1:
            # ~1 us of fence + counter + partial reads, in units of one warp batch at the SM's share.
            cost += _SPLIT_COST_NS / _BATCH_NS + splits * m / 16
        if cost < best_cost - 1e-9:
            best, best_cost = splits, cost
    return best


# plan_one_row's cost model: a 16-warp block of the one-row kernel pulls at most ~40 B/ns (its
# cp.async copies in flight over the HBM latency), so a layer with few column tiles needs more
# blocks to reach the memory's rate where that rate is high: narrow 32-column tiles (twice the
# blocks, no cost of their own) or K splits (each split costs ~_SPLIT_COST_NS: partials, a fence,
# a counter and the last block's reduction). Fitted to Qwen3-8B bs1 in the decode graph (processes
# alternating) before narrow tiles existed: on an H100 (3.35 TB/s) o_proj unsplit and down_proj in
# 2 splits measured 2.320 / 2.324 ms against 2.341 / 2.347 with both in 2 and 2.373 / 2.376 with both
# unsplit (run T135); on an H200 (4.8 TB/s) 2 splits for both stayed best (o_proj unsplit
# 1.973-1.984 against 1.962-1.978, T136; both unsplit ~5 % slower, T84). Narrow tiles for o and
# down against those plans (runs T237 / T240, the old plans forced): the step 3.3 % faster on an
# H100 (2.187-2.197 against 2.259-2.267 ms) and 3.4 % on an H200 (1.849 against 1.911-1.915).
_ONE_ROW_BLOCK_BYTES_PER_NS = 40.0


class OneRowPlan(NamedTuple):
    """How the one-row kernel runs a layer: warps per block, K splits, columns per block."""

    warps: int
    splits: int
    tile_n: int = TILE_N


def plan_one_row(n: int, k: int, sm_count: int, hbm_bytes_per_ns: float = math.inf) -> OneRowPlan:
    """The one-row kernel's plan (warps per block, K splits, tile columns) for an [K/8, N] weight on
    a GPU of ``sm_count`` SMs whose memory streams ``hbm_bytes_per_ns`` (inf: unknown, no cap).

    A block of 16 warps takes an SM (~90 registers per thread: no second block fits), so layers
    with no more column tiles than SMs get 16-warp blocks; wider layers get 8-warp blocks (3 per
    SM) and no split. A 16-warp launch picks the tile width (64 columns, or 32 where the narrow
    tiles still fit on the SMs and leave a deferred norm's consumer at most MAX_NORM_TILES tile
    sums) and the K splits, up to covering the SMs once, that minimise weight bytes /
    min(blocks x per-block pull, memory rate) + a fixed cost when split (the model above), the
    wide tiles and then the fewest splits among equal costs. Qwen3-8B on an H100 or H200: qkv
    (96 tiles) unsplit, o and down (64 tiles) in 128 narrow tiles unsplit, gate/up (384 tiles) in
    8-warp blocks. A gated launch is planned as the plain launch of the same weight (same blocks,
    same sum order; a narrow gated tile holds 16 gate and the matching 16 up columns).
    """
    tiles = math.ceil(n / TILE_N)
    if tiles > sm_count:
        return OneRowPlan(8, 1, TILE_N)
    weight_bytes = n * k / 2
    candidates = []
    for tile_n in ONE_ROW_TILES:
        tiles = math.ceil(n / tile_n)
        if tiles > sm_count or (tile_n != TILE_N and tiles > MAX_NORM_TILES):
            continue
        batches = math.ceil(k / 8 / one_row_batch_rows(tile_n))
        most = max(1, min(sm_count // tiles, batches))
        while most > 1 and tiles * most * tile_n > WORKSPACE_FLOATS:
            most -= 1
        for splits in range(1, most + 1):
            rate = min(tiles * splits * _ONE_ROW_BLOCK_BYTES_PER_NS, hbm_bytes_per_ns)
            cost = weight_bytes / rate + (_SPLIT_COST_NS if splits > 1 else 0.0)
            candidates.append((cost, tile_n != TILE_N, splits, tile_n))
    cost, _, splits, tile_n = min(candidates, key=lambda c: (round(c[0], 6), c[1], c[2]))
    return OneRowPlan(16, splits, tile_n)


@functools.lru_cache(maxsize=None)
def sm_count_of(index: int) -> int:
    """The SM count of CUDA device ``index`` (cached: the plans ask on every launch)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=4096)
def _auto_splits(m: int, n: int, k: int, device_index: int) -> int:
    return plan_splits(m, n, k, sm_count_of(device_index))


@functools.lru_cache(maxsize=None)
def hbm_bytes_per_ns(index: int) -> float:
    """The device memory's peak rate (double data rate x bus width) in bytes per ns, or inf where
    torch does not report the clock and bus width."""
    props = torch.cuda.get_device_properties(index)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return math.inf
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


@functools.lru_cache(maxsize=4096)
def _auto_one_row(n: int, k: int, device_index: int) -> OneRowPlan:
    return plan_one_row(n, k, sm_count_of(device_index), hbm_bytes_per_ns(device_index))


def _narrow_message(warps: Optional[int], rows: int) -> str:
    return (f"{_OP}: narrow tiles (one_row_tile_n={NARROW_TILE_N}) run in 16-warp one-row blocks (one "
            f"activation row, one_row_warps 16 or planned so), got one_row_warps={warps!r} and {rows} rows")


_workspaces: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partials, int32 counters) for ``device``, allocated on first use and then reused.

    Counters start at zero and every launch leaves them at zero. Allocating inside CUDA graph
    capture would tie the buffer to the graph's memory pool, so that is refused.
    """
    buffers = _workspaces.get(device)
    if buffers is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{_OP}: call it once on {device} before CUDA graph capture, so its workspace "
                               "is allocated outside the graph")
        buffers = (torch.empty(WORKSPACE_FLOATS, dtype=torch.float32, device=device),
                   torch.zeros(MAX_TILES, dtype=torch.int32, device=device))
        _workspaces[device] = buffers
    return buffers


@jit("w4a16_gemv", entry="mllm_kernel::w4a16_gemv", cuda_sources=["cuda/csrc/w4a16_gemv/w4a16_gemv.cuh"])
def w4a16_gemv(
    kernel: JitKernel,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    bias: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    splits: Optional[int] = None,
    prefetch: int = PREFETCH_BATCHES,
    validate: bool = True,
    gated: bool = False,
    one_row_warps: Optional[int] = None,
    one_row_tile_n: Optional[int] = None,
    early_weights: bool = True,
    early_dependents: bool = EARLY_DEPENDENTS,
    norm_out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    norm_in: Optional[Tuple[torch.Tensor, float]] = None,
) -> torch.Tensor:
    """x [M, K] (M <= 64) @ W (+ bias) -> [M, N] in x's dtype; see the module docstring for the
    layout. ``out`` (contiguous [M, N]) is written in place when given. ``splits`` overrides the
    K split and ``prefetch`` (0..8) the register kernel's L2 prefetch distance in batches
    (benchmarks); ``one_row_warps`` picks the kernel of a one-row call (8 or 16: the one-row kernel
    in blocks of that many warps; 0: the register kernel; None: ``plan_one_row``), ``one_row_tile_n``
    its columns per block (64, or 32 with 16 warps; None: the plan's, or 64 where the warps are forced) and
    ``early_weights`` whether the one-row kernel copies its first weights before waiting on the
    kernel before it (PDL), ``early_dependents`` whether a launch whose grid fits in one wave lets
    the kernel after it launch at its start (else after its k loop). ``validate=False`` skips the
    Python checks for callers that already ran ``supported`` (the C++ entry still checks shapes,
    dtypes and alignment). ``gated=True``: the
    weight stacks a gate and an up projection ([K/8, 2H], bias [2H]) and the result is
    ``silu(gate) * up`` [M, H], each half rounded to x's dtype first and combined as pymllm's
    SiLU-and-mul kernel does: the plain launch followed by that kernel, in one kernel.
    ``norm_out`` = (residual, norm_weight, residual_out, sumsq_out) and ``norm_in`` = (sumsq, eps):
    the deferred RMSNorm's producer and consumer sides (one row; use ``w4a16_gemv_add_norm`` and
    ``w4a16_gemv_normed``, which check and allocate them)."""
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
        raise ValueError(f"{_OP}: splits must be a positive int, got {splits!r}")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 0 <= prefetch <= 8:
        raise ValueError(f"{_OP}: prefetch must be an int in 0..8, got {prefetch!r}")
    if one_row_warps is not None and (isinstance(one_row_warps, bool) or not isinstance(one_row_warps, int)
                                      or one_row_warps not in (0, *ONE_ROW_WARPS)):
        raise ValueError(f"{_OP}: one_row_warps must be None, 0 or one of {ONE_ROW_WARPS}, got {one_row_warps!r}")
    if one_row_tile_n is not None and (isinstance(one_row_tile_n, bool) or one_row_tile_n not in ONE_ROW_TILES):
        raise ValueError(f"{_OP}: one_row_tile_n must be None or one of {ONE_ROW_TILES}, got {one_row_tile_n!r}")
    if one_row_tile_n == NARROW_TILE_N:
        rows = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 2 else 1
        if one_row_warps not in (None, 16) or rows != 1:
            raise ValueError(_narrow_message(one_row_warps, rows))
    if validate:
        check_arguments(x, qweight, scales, zeros, group, bias, out, gated)
    m, k = x.shape
    n = qweight.shape[1]
    if one_row_warps and m != 1:
        raise ValueError(f"{_OP}: one_row_warps={one_row_warps} needs one activation row, got {m}")
    if norm_out is not None and norm_in is not None:
        raise ValueError(f"{_OP}: a launch is a deferred RMSNorm's producer or its consumer, not both")
    if (norm_out is not None or norm_in is not None) and (m != 1 or one_row_warps == 0):
        raise ValueError(f"{_OP}: a deferred RMSNorm runs in the one-row kernel (M = 1), got M = {m}, "
                         f"one_row_warps={one_row_warps}")
    if out is None:
        out = torch.empty((m, n // 2 if gated else n), dtype=x.dtype, device=x.device)
    device_index = _device_index(x)
    if m == 1 and one_row_warps is None:
        plan = _auto_one_row(n, k, device_index)
        one_row_warps = plan.warps
        splits = plan.splits if splits is None else splits
        one_row_tile_n = plan.tile_n if one_row_tile_n is None else one_row_tile_n
    one_row_warps = one_row_warps or 0
    if one_row_tile_n == NARROW_TILE_N and one_row_warps != 16:  # the plan chose 8-warp blocks
        raise ValueError(_narrow_message(one_row_warps, m))
    if one_row_tile_n is None:
        one_row_tile_n = TILE_N
    if norm_out is not None and norm_out[3].numel() != norm_tiles(n, one_row_tile_n):
        raise ValueError(f"{_OP}: the deferred norm's producer writes {norm_tiles(n, one_row_tile_n)} tile sums "
                         f"(tiles of {one_row_tile_n} columns), got room for {norm_out[3].numel()}")
    if splits is None:
        splits = _auto_splits(m, n, k, device_index)
    if n:
        partials, counters = workspace(x.device)
        residual, norm_weight, residual_out, sumsq_out = norm_out if norm_out is not None else (None,) * 4
        sumsq, eps = norm_in if norm_in is not None else (None, 0.0)
        kernel[x.dtype, zeros is not None, bool(gated)](out, x, qweight, scales, zeros, bias, partials, counters,
                                                        group, splits, prefetch, one_row_warps, one_row_tile_n,
                                                        bool(early_weights),
                                                        bool(early_dependents), use_pdl(x.device), residual,
                                                        norm_weight, residual_out, sumsq_out, sumsq, float(eps))
    return out


def norm_tiles(n: int, tile_n: int = TILE_N) -> int:
    """Tile sums of h^2 a deferred-norm producer of N outputs in tiles of ``tile_n`` columns writes."""
    return math.ceil(n / tile_n)


def norm_tile_sums(h: torch.Tensor, tile_n: int = TILE_N) -> torch.Tensor:
    """float32 sums of h^2 over each ``tile_n``-column tile of one row: what a producer hands on."""
    n = h.shape[-1]
    squares = torch.zeros(norm_tiles(n, tile_n) * tile_n, dtype=torch.float64, device=h.device)
    squares[:n] = h.reshape(-1).double() ** 2
    return squares.reshape(-1, tile_n).sum(1).float()


def _norm_problem(x: torch.Tensor, n: int, vectors: Dict[str, torch.Tensor]) -> Optional[str]:
    if x.dim() != 2 or x.shape[0] != 1:
        return f"a deferred RMSNorm takes one activation row, got x of shape {tuple(x.shape)}"
    for name, t in vectors.items():
        if not isinstance(t, torch.Tensor) or t.dtype != x.dtype or t.device != x.device:
            return f"{name} must be a tensor of x's dtype {x.dtype} on {x.device}"
        if t.numel() != n or not t.is_contiguous():
            return f"{name} must be contiguous with {n} elements, got shape {tuple(t.shape)}"
    return None


def add_norm_supported(x: torch.Tensor, qweight: torch.Tensor, residual: torch.Tensor,
                       norm_weight: torch.Tensor) -> bool:
    """Whether ``w4a16_gemv_add_norm`` takes these norm arguments (the dispatcher's test; the
    GEMV's own arguments are ``supported``'s)."""
    return _norm_problem(x, qweight.shape[1], {"residual": residual, "norm_weight": norm_weight}) is None


def w4a16_gemv_add_norm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    validate: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The producer of a deferred RMSNorm, for one row x [1, K]: with out = x @ W (+ bias) rounded,
    returns (``norm_weight * h`` [1, N], h = out + residual [1, N], per-tile sums of h^2 float32
    [norm_tiles(N, the plan's tile width)]), each product and sum rounded as the fused add + RMSNorm
    kernel rounds its h.
    Hand the three to the next GEMV (``w4a16_gemv_normed``) instead of running the norm."""
    if validate:
        check_arguments(x, qweight, scales, zeros, group, bias)
    n = qweight.shape[1]
    problem = _norm_problem(x, n, {"residual": residual, "norm_weight": norm_weight})
    if problem is not None:
        raise ValueError(f"{_OP}: {problem}")
    residual_out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    plan = _auto_one_row(n, x.shape[1], _device_index(x))
    sumsq = torch.empty(norm_tiles(n, plan.tile_n), dtype=torch.float32, device=x.device)
    out = w4a16_gemv(x, qweight, scales, zeros, group, bias, validate=False, one_row_warps=plan.warps,
                     one_row_tile_n=plan.tile_n, splits=plan.splits,
                     norm_out=(residual, norm_weight, residual_out, sumsq))
    return out, residual_out, sumsq


def w4a16_gemv_normed(
    scaled: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    sumsq: torch.Tensor,
    eps: float,
    bias: Optional[torch.Tensor] = None,
    gated: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """The consumer of a deferred RMSNorm: ``w4a16_gemv(rms_norm(h), ...)`` from the producer's
    ``scaled`` = norm_weight * h [1, K] and its per-tile sums of h^2: the GEMV of ``scaled`` with every
    output scaled by rsqrt(sum(sumsq) / K + eps) before the bias (``gated``: before the SiLU-and-mul)."""
    if validate:
        check_arguments(scaled, qweight, scales, zeros, group, bias, gated=gated)
    problem = _norm_problem(scaled, qweight.shape[0] * 8, {})
    if problem is not None:
        raise ValueError(f"{_OP}: {problem}")
    if (not isinstance(sumsq, torch.Tensor) or sumsq.dtype != torch.float32 or sumsq.device != scaled.device
            or not sumsq.is_contiguous() or not 1 <= sumsq.numel() <= MAX_NORM_TILES):
        raise ValueError(f"{_OP}: sumsq must be a contiguous float32 tensor of 1..{MAX_NORM_TILES} tile sums on "
                         f"{scaled.device}")
    return w4a16_gemv(scaled, qweight, scales, zeros, group, bias, validate=False, gated=gated,
                      norm_in=(sumsq, float(eps)))


def build_step(dtype: torch.dtype, with_zeros: bool, gated: bool, device: torch.device) -> BuildStep:
    """The instance calls with these activations, zero-point mode and form compile."""
    return w4a16_gemv.kernel[dtype, bool(with_zeros), bool(gated)].build_step(device)
