"""w4a16_gemm: tensor-core GEMM with 4-bit weights for batches of tens to hundreds of rows.

    out [M, N] = x [M, K] @ W (+ bias),   W[k, n] = (q[k, n] - 8 - zeros[k // G, n]) * scales[k // G, n]

The layout is w4a16_gemv's (qweight [K/8, N] int32, scales / zeros [K/G, N] in x's dtype). Each
weight is dequantized to x's dtype once per row tile of 16, 32 or 64 rows ((q - 8 - zero) * scale
rounded once, as ``w4a16_dequantize`` rounds it) and multiplied on tensor cores (mma.sync, SM80+)
with fp32 accumulation; activation and weight tiles are staged through shared memory by cp.async.
The GEMV re-reads and re-unpacks every weight for each further 16 rows, so from a few tens of rows
this kernel does the same work with a fraction of the instructions.

Split K runs in the same launch, in w4a16_gemv's per-device workspace (``workspace``: the first
call of either kernel must happen outside CUDA graph capture; launches on one device must be
ordered, as pymllm's forward is: both leave the counters at zero and write partials only inside a
launch). On SM90+ it launches as a programmatic dependent (mllm_kernel.pdl).

On SM 9.0 (H100/H200) rows past ``WGMMA_MIN_M`` go to a second kernel, ``w4a16_gemm_sm90``
(built for sm_90a): the same product in the same layout on warpgroup MMAs, with row tiles of 64,
128 or 256 (w4a16_gemm_sm90_kernel.cuh). ``kernel="mma"`` / ``"wgmma"`` forces one of the two.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch

from mllm_kernel.cuda.jit.w4a16_gemv import (
    MAX_TILES, WORKSPACE_FLOATS, argument_problem, sm_count_of, workspace,
)
from mllm_kernel.jit_utils import BuildStep, JitKernel, jit
from mllm_kernel.jit_utils.target import SM90A, Target, device_capability, target_for
from mllm_kernel.pdl import use_pdl

_OP = "w4a16_gemm"
# Mirrors of the kernel's tiling (w4a16_gemm_kernel.cuh).
TILE_N = 128
TILE_K = 64
TILE_MS = (16, 32, 64)
# Split K uses the GEMV's workspace: fp32 partials of (slots x splits x tile_m x TILE_N), one
# counter per slot (WORKSPACE_FLOATS, MAX_TILES counters).
MAX_SLOTS = MAX_TILES
# A split keeps at least this many K tiles, so its pipeline (4 stages) runs past its prologue.
MIN_K_TILES_PER_SPLIT = 8
# The warpgroup-MMA kernel (SM 9.0): its row tiles, and the rows from which it runs by default.
WGMMA_TILE_MS = (64, 128, 256)
WGMMA_MIN_M = 65
KERNELS = ("mma", "wgmma")


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def wgmma_available(device: torch.device) -> bool:
    """Whether ``w4a16_gemm_sm90`` runs on ``device``: SM 9.0 only (its wgmma needs sm_90a)."""
    return device_capability(device) == (9, 0)


def _wgmma_target(device: torch.device) -> Target:
    """sm_90a (arch-specific wgmma) where the kernel runs; elsewhere the device's own target,
    for which the kernel compiles to an empty body that the host refuses to launch."""
    return SM90A if wgmma_available(device) else target_for(device)


def kernel_for(m: int, device: torch.device) -> str:
    """The kernel ``w4a16_gemm`` runs for m rows on ``device`` unless told."""
    return "wgmma" if m >= WGMMA_MIN_M and wgmma_available(device) else "mma"


def tile_rows(m: int, n: int, sm_count: int) -> int:
    """The row tile for m rows of N columns, from the sweep of run T195 (H100, Qwen3-8B layers):
    16 up to 16 rows, and up to 32 where 32-row tiles would leave SMs idle; 64 once 64-row tiles
    give every SM about three blocks (gate_up from 96 rows, every layer at prefill sizes); else 32."""
    cols = -(-n // TILE_N)
    if m <= 16 or (m <= 32 and cols < sm_count):
        return 16
    if 10 * -(-m // 64) * cols >= 29 * sm_count:
        return 64
    return 32


def plan(m: int, n: int, k: int, sm_count: int) -> Tuple[int, int]:
    """(tile_m, splits) for a launch: K is split (in powers of two dividing K / 64, each split at
    least MIN_K_TILES_PER_SPLIT tiles, within the workspace) while the blocks number fewer than
    ~1.9 per SM (T195: the best split per shape kept 1.5-4 blocks per SM; splitting Qwen3-8B's
    o_proj at 256 rows, 256 blocks, in two was 17 % slower)."""
    tile_m = tile_rows(m, n, sm_count)
    slots = -(-m // tile_m) * -(-n // TILE_N)
    k_tiles = k // TILE_K
    splits = 1
    while (10 * slots * splits < 19 * sm_count and k_tiles % (2 * splits) == 0
           and k_tiles // (2 * splits) >= MIN_K_TILES_PER_SPLIT and slots <= MAX_SLOTS
           and slots * 2 * splits * tile_m * TILE_N <= WORKSPACE_FLOATS):
        splits *= 2
    return tile_m, splits


def wgmma_tile_rows(m: int) -> int:
    """The warpgroup kernel's row tile, from the sweep of run T206 (H100, Qwen3-8B layers): 64 up
    to 128 rows (two blocks per SM: at 128 rows 64-row tiles were 10-30 % faster than 128-row
    ones on every layer), 128 up to 512 (faster on three of the four layers at 256 rows), 256
    beyond (at 2,048 rows 20-35 % faster than 128)."""
    if m <= 128:
        return 64
    return 128 if m <= 512 else 256


def wgmma_plan(m: int, n: int, k: int, sm_count: int) -> Tuple[int, int]:
    """(tile_m, splits) for the warpgroup kernel: K is split (powers of two, each split at least
    MIN_K_TILES_PER_SPLIT tiles, within the workspace) while the doubled grid still fits in one
    wave (two blocks per SM at 64-row tiles, one above)."""
    tile_m = wgmma_tile_rows(m)
    per_sm = 2 if tile_m == 64 else 1
    slots = -(-m // tile_m) * -(-n // TILE_N)
    k_tiles = k // TILE_K
    splits = 1
    while (2 * slots * splits <= per_sm * sm_count and k_tiles % (2 * splits) == 0
           and k_tiles // (2 * splits) >= MIN_K_TILES_PER_SPLIT and slots <= MAX_SLOTS
           and slots * 2 * splits * tile_m * TILE_N <= WORKSPACE_FLOATS):
        splits *= 2
    return tile_m, splits


@functools.lru_cache(maxsize=4096)
def _auto_plan(m: int, n: int, k: int, device_index: int, kernel: str = "mma") -> Tuple[int, int]:
    rule = wgmma_plan if kernel == "wgmma" else plan
    return rule(m, n, k, sm_count_of(device_index))


def _gemm_problem(x, qweight, scales, zeros, group, bias, out) -> Optional[Tuple[type, str]]:
    if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] % TILE_K:
        return ValueError, f"K (x.shape[1] = {x.shape[1]}) must be a multiple of {TILE_K}"
    problem = argument_problem(x, qweight, scales, zeros, group, bias, out, max_m=None)
    if problem is not None and "CUDA only" in problem[1]:
        return ValueError, f"CUDA only, got tensors on {x.device}; use w4a16_gemm_reference"
    return problem


def supported(x, qweight, scales, zeros, group, bias=None) -> bool:
    """Whether w4a16_gemm takes these arguments (the dispatcher's shape/layout test)."""
    return _gemm_problem(x, qweight, scales, zeros, group, bias, None) is None


def check_arguments(x, qweight, scales, zeros, group, bias=None, out=None) -> None:
    """Raise TypeError/ValueError naming the first argument w4a16_gemm cannot take."""
    problem = _gemm_problem(x, qweight, scales, zeros, group, bias, out)
    if problem is not None:
        error, message = problem
        raise error(f"{_OP}: {message}")


@jit("w4a16_gemm", entry="mllm_kernel::w4a16_gemm", cuda_sources=["cuda/csrc/w4a16_gemm/w4a16_gemm.cuh"])
def _w4a16_gemm_mma(kernel: JitKernel, *args) -> None:
    kernel[args[1].dtype, args[4] is not None](*args)


@jit("w4a16_gemm_sm90", entry="mllm_kernel::w4a16_gemm_sm90",
     cuda_sources=["cuda/csrc/w4a16_gemm/w4a16_gemm_sm90.cuh"], target_of=_wgmma_target)
def _w4a16_gemm_wgmma(kernel: JitKernel, *args) -> None:
    kernel[args[1].dtype, args[4] is not None](*args)


def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    bias: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    splits: Optional[int] = None,
    tile_m: Optional[int] = None,
    validate: bool = True,
    kernel: Optional[str] = None,
) -> torch.Tensor:
    """x [M, K] (K a multiple of 64) @ W (+ bias) -> [M, N] in x's dtype; see the module docstring.
    ``out`` (contiguous [M, N]) is written in place when given. ``kernel`` ("mma" or "wgmma";
    default ``kernel_for``), ``splits`` (dividing K / 64) and ``tile_m`` (16, 32 or 64 for "mma";
    64, 128 or 256 for "wgmma") override the plan (benchmarks, tests). ``validate=False`` skips
    the Python checks for callers that already ran ``supported``."""
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"{_OP}: kernel must be one of {KERNELS}, got {kernel!r}")
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
        raise ValueError(f"{_OP}: splits must be a positive int, got {splits!r}")
    if tile_m is not None and tile_m not in TILE_MS + WGMMA_TILE_MS:
        raise ValueError(f"{_OP}: tile_m must be one of {TILE_MS} (mma) or {WGMMA_TILE_MS} (wgmma), got {tile_m!r}")
    if validate:
        check_arguments(x, qweight, scales, zeros, group, bias, out)
    m, k = x.shape
    n = qweight.shape[1]
    kernel = kernel or kernel_for(m, x.device)
    if kernel == "wgmma" and not wgmma_available(x.device):
        raise ValueError(f"{_OP}: the wgmma kernel needs an SM 9.0 GPU, got {x.device}")
    tiles = WGMMA_TILE_MS if kernel == "wgmma" else TILE_MS
    if tile_m is not None and tile_m not in tiles:
        raise ValueError(f"{_OP}: tile_m must be one of {tiles} for the {kernel} kernel, got {tile_m!r}")
    if splits is not None and (k // TILE_K) % splits:
        raise ValueError(f"{_OP}: splits ({splits}) must divide K / {TILE_K} = {k // TILE_K}")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    planned_tile, planned_splits = _auto_plan(m, n, k, _device_index(x.device), kernel)
    tile_m = tile_m or planned_tile
    splits = splits or planned_splits
    partials, counters = workspace(x.device)
    launch = _w4a16_gemm_wgmma if kernel == "wgmma" else _w4a16_gemm_mma
    launch(out, x, qweight, scales, zeros, bias, partials, counters, group, splits, tile_m, use_pdl(x.device))
    return out


def build_steps(dtype: torch.dtype, with_zeros: bool, device: torch.device) -> List[BuildStep]:
    """The instances calls with these activations and zero-point mode compile on ``device``:
    the mma.sync kernel, and on SM 9.0 the warpgroup kernel."""
    kernels = [_w4a16_gemm_mma] + ([_w4a16_gemm_wgmma] if wgmma_available(device) else [])
    return [launch.kernel[dtype, bool(with_zeros)].build_step(device) for launch in kernels]

