"""W4A16: the one checkpoint -> runtime repack, the PyTorch reference, and the GEMM dispatcher.

Checkpoint (compressed-tensors ``pack-quantized``, 4 bits):
  weight_packed [N, K/8] int32, word (n, j) holds w[n, 8j + i] + 8 in bits 4i..4i+3;
  weight_scale [N, K/G]; weight_zero_point [N/8, K/G] int32 (asymmetric), packed the same way
  along N. Runtime layout: see ``w4a16_triton`` (words transposed to [K/8, N], scales and
  unpacked zero points as [K/G, N]).

Dispatch (``choose_w4a16_kernel``): M <= 64 on SM80+ runs mllm_kernel's CUDA GEMV
(``w4a16_gemv``: tensor-core dequant-GEMV streaming the int4 weights, split K in one launch; 9..16
rows share one pass over the weights, more rows run in chunks of 16 that share it through L2)
when it is importable, builds and passes a one-time self-test on the device, and takes the
shapes. It beats the fused Triton dequant-GEMM at every row count up to 64 (H200, Qwen3-8B layers:
72 against 135 us per layer at 16 rows, 102 against 165 at 32, 167 against 212 at 64; run T38 in
docs/perf), which runs where the GEMV cannot (M <= 64). Larger M dequantizes the weight into a
scratch matrix and uses cuBLAS, except from 65 to ``FUSED_MAX_M`` rows where the large-M Triton
kernel (dequantizing tile by tile in registers) measures faster for the layer's shape on this GPU
(``fused_measured_faster``): there writing and re-reading the bf16 weight costs more than the
Triton kernel's slower tensor-core loop (H100, Qwen3-8B, run T190: gate_up 106 against 176 us at
128 rows and 168 against 184 at 256, down 72 against 98 and 95 against 105, qkv 42 against 54 and
62 against 58), past it the reverse (512 rows: gate_up 288 against 237; 2,048 rows: about half
cuBLAS's rate against its 0.85-0.9 with the dequantization). From GEMM_MIN_M to GEMM_MAX_M rows
mllm_kernel's tensor-core GEMM (``w4a16_gemm``: each weight dequantized once per row tile) is
measured against whichever of those would run and replaces it where faster (H100, Qwen3-8B, run
T204: gate/up and down at 64 rows, gate/up to 192; decode step 6 % faster at 64 requests). On SM 9.0
``w4a16_gemm`` itself runs its warpgroup-MMA kernel from 65 rows (T207/T210: gate/up and down win
at 112-256 rows, qkv from 160; decode step 9-12 % faster at 96-192 requests than with the mma.sync
GEMM).
Everything else (CPU, odd shapes) uses the reference.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from pymllm.quantization.kernels.device import cuda_capability, triton_available


GEMV_MAX_M = 64  # mllm_kernel.w4a16_gemv serves 1..64 rows
TRITON_MAX_M = 64  # w4a16_triton.MAX_M (not imported here: that would import Triton)
# Rows up to which the large-M Triton kernel is measured against dequantize + cuBLAS (T190, H100:
# it lost on every Qwen3-8B layer at 512 rows).
FUSED_MAX_M = 256
# Rows for which mllm_kernel's tensor-core W4A16 GEMM (``w4a16_gemm``) is measured against the
# kernel chosen otherwise. Up to 16 rows the GEMV's one or two MMA row groups unpack each weight
# once, as the GEMM does; at 17..32 rows the GEMM measured up to 10 % faster on its own but the
# decode step with it was 2 % slower (H100, Qwen3-8B, 32 requests, T196: graph 5.211 against
# 5.110 ms), so the GEMV keeps them. Past 256 rows the Triton kernel or cuBLAS after dequantizing
# won every Qwen3-8B layer (T195: down 119 against 96 / 104 us at 256 rows).
GEMM_MIN_M = 33
GEMM_MAX_M = 256


def fused_rows_bucket(m: int) -> int:
    """The row count whose measurement serves ``m`` rows: 16-row buckets to 128 (65..80, 81..96,
    ...), 32-row ones past it."""
    step = 16 if m <= 128 else 32
    return -(-m // step) * step

_SHIFTS = torch.arange(8, dtype=torch.int32) * 4


def _unpack_rows(words: torch.Tensor) -> torch.Tensor:
    """[R, C] int32 words -> [R, 8C] int32 nibbles (unsigned, 0..15), nibble i of word c at 8c + i."""
    nibbles = (words.unsqueeze(-1) >> _SHIFTS.to(words.device)) & 0xF
    return nibbles.reshape(words.shape[0], -1)


def repack_wna16(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: Optional[torch.Tensor],
    dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Checkpoint tensors -> (qweight [K/8, N] int32, scales [K/G, N], zeros [K/G, N] or None)."""
    qweight = weight_packed.t().contiguous()
    scales = weight_scale.t().to(dtype).contiguous()
    zeros = None
    if weight_zero_point is not None:
        n = weight_scale.shape[0]
        unpacked = _unpack_rows(weight_zero_point.t().contiguous())[:, :n] - 8  # [K/G, N]
        zeros = unpacked.to(dtype).contiguous()
    return qweight, scales, zeros


def dequantize_wna16_reference(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group: int, dtype: torch.dtype
) -> torch.Tensor:
    """Dense W^T [K, N] of ``dtype`` from the runtime layout, in float32 then rounded once."""
    k = qweight.shape[0] * 8
    q = _unpack_rows(qweight.t().contiguous()).t().float() - 8.0  # [K, N]
    rows = torch.arange(k, device=qweight.device) // group
    if zeros is not None:
        q = q - zeros.float()[rows]
    return (q * scales.float()[rows]).to(dtype)


def w4a16_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    w = dequantize_wna16_reference(qweight, scales, zeros, group, x.dtype)
    out = x @ w
    return out + bias if bias is not None else out


def fast_path_supported(x: torch.Tensor, n: int, k: int, group: int) -> bool:
    """The capability check of the dispatcher: Triton, SM80+, fp16/bf16, dense rows, K tiles."""
    return (
        triton_available()
        and cuda_capability(x.device) >= (8, 0)
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.stride(-1) == 1
        and k % 64 == 0
        and k % group == 0
        and n % 8 == 0
    )


def choose_w4a16_kernel(m: int, sm80: bool, gemv_ok: bool, triton_ok: bool,
                        fused_faster: Callable[[], bool] = lambda: False, gemm_ok: bool = False,
                        gemm_faster: Callable[[str], bool] = lambda rival: False) -> str:
    """Which W4A16 GEMM runs: "cuda_gemv", "cuda_gemm", "triton_small_m", "triton_large_m",
    "dequant_cublas" or "reference".

    gemv_ok: the CUDA GEMV is ready on this device and takes these arguments; triton_ok: the
    Triton kernels can run them (``fast_path_supported``); fused_faster: whether the large-M
    kernel measures faster than dequantize + cuBLAS here (asked only for 65..FUSED_MAX_M rows);
    gemm_ok: the CUDA tensor-core GEMM is ready and takes them (GEMM_MIN_M..GEMM_MAX_M rows);
    gemm_faster(rival): whether it measures faster than the kernel chosen without it.
    The GEMV streams the weights in one launch and beats the Triton kernel at decode sizes
    (bench_w4a16_gemv.py); the small-M Triton kernel takes M <= 64 where the GEMV cannot run."""
    if m == 0 or not sm80:
        return "reference"
    if m <= GEMV_MAX_M and gemv_ok:
        rival = "cuda_gemv"
    elif not triton_ok:
        rival = "reference"
    elif m <= TRITON_MAX_M:
        rival = "triton_small_m"
    else:
        rival = "triton_large_m" if m <= FUSED_MAX_M and fused_faster() else "dequant_cublas"
    if gemm_ok and GEMM_MIN_M <= m <= GEMM_MAX_M and (rival == "reference" or gemm_faster(rival)):
        return "cuda_gemm"
    return rival


def _kernel_call(kernel: str, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: Optional[torch.Tensor], group: int, bias: Optional[torch.Tensor]) -> Callable[[], object]:
    """A call of ``kernel`` (a choose_w4a16_kernel choice other than "reference") on these
    arguments, the dispatchers' arguments already validated; Triton is imported only for its kernels."""
    if kernel == "cuda_gemv":
        from mllm_kernel.cuda.jit.w4a16_gemv import w4a16_gemv

        return lambda: w4a16_gemv(x, qweight, scales, zeros, group, bias, validate=False)
    if kernel == "cuda_gemm":
        from mllm_kernel.cuda.jit.w4a16_gemm import w4a16_gemm

        return lambda: w4a16_gemm(x, qweight, scales, zeros, group, bias, validate=False)
    from pymllm.quantization.kernels import w4a16_triton

    if kernel == "triton_small_m":
        return lambda: w4a16_triton.w4a16_gemm_small_m(x, qweight, scales, zeros, group, bias)
    if kernel == "triton_large_m":
        return lambda: w4a16_triton.w4a16_gemm_large_m(x, qweight, scales, zeros, group, bias)
    return lambda: _dequant_cublas(x, qweight, scales, zeros, group, bias)


def _dequant_cublas(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                    group: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    from pymllm.quantization.kernels import w4a16_triton

    w = w4a16_triton.w4a16_dequantize(qweight, scales, zeros, group, x.dtype)
    return torch.addmm(bias, x, w) if bias is not None else x @ w


def _measured_faster(kind: str, x: torch.Tensor, qweight: torch.Tensor,
                     candidate: Callable[[torch.Tensor], Callable[[], object]],
                     rival: Callable[[torch.Tensor], Callable[[], object]], labels: Tuple[str, str]) -> bool:
    """Whether ``candidate(weight)``'s call beats ``rival(weight)``'s for this layer shape and row
    bucket, measured once per (kind, device, dtype, N, K, ``fused_rows_bucket``) by the decode
    matmuls' chooser (CUDA graphs over copies of the weight that miss L2, the first time outside a
    capture; a shape first seen inside a capture keeps the rival)."""
    from pymllm.layers.kernels.gemv_dispatch import CHOOSER

    n, k = qweight.shape[1], qweight.shape[0] * 8
    key = (kind, x.device, x.dtype, n, k, fused_rows_bucket(x.shape[0]))
    return CHOOSER.use_gemv(key, qweight, lambda impl, words: (rival if impl == "gemm" else candidate)(words),
                            labels=labels)


def fused_measured_faster(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          zeros: Optional[torch.Tensor], group: int, bias: Optional[torch.Tensor]) -> bool:
    """Whether the large-M Triton kernel beats dequantize + cuBLAS for this layer shape and row
    bucket (``_measured_faster``)."""
    return _measured_faster(
        "w4a16 large-M", x, qweight,
        lambda words: _kernel_call("triton_large_m", x, words, scales, zeros, group, bias),
        lambda words: _kernel_call("dequant_cublas", x, words, scales, zeros, group, bias),
        ("large-M Triton", "dequantize + cuBLAS"))


def gemm_measured_faster(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                         zeros: Optional[torch.Tensor], group: int, bias: Optional[torch.Tensor], rival: str) -> bool:
    """Whether mllm_kernel's tensor-core GEMM beats ``rival`` (a choose_w4a16_kernel name) for this
    layer shape and row bucket (``_measured_faster``)."""
    return _measured_faster(
        f"w4a16 GEMM vs {rival}", x, qweight,
        lambda words: _kernel_call("cuda_gemm", x, words, scales, zeros, group, bias),
        lambda words: _kernel_call(rival, x, words, scales, zeros, group, bias),
        ("tensor-core GEMM", rival.replace("_", " ")))


def gemm_swiglu_measured_faster(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                                zeros: Optional[torch.Tensor], group: int, bias: Optional[torch.Tensor]) -> bool:
    """For a stacked [gate; up] weight: whether the tensor-core GEMM followed by the SiLU-and-mul
    kernel beats the gated GEMV (one kernel). Against the plain GEMV alone the GEMM won gate/up at
    48 rows by 4 % but made the decode step 4 % slower (H100, Qwen3-8B, T203: graph 6.98-7.00
    against 6.68-6.70 ms): the extra kernel and the gate/up output's round trip through memory are
    the difference."""
    from mllm_kernel.cuda.jit.w4a16_gemv import w4a16_gemv

    from pymllm.layers.fused_ops import silu_and_mul

    def gemm_then_silu(words: torch.Tensor) -> Callable[[], object]:
        gemm = _kernel_call("cuda_gemm", x, words, scales, zeros, group, bias)
        return lambda: silu_and_mul(gemm())

    return _measured_faster(
        "w4a16 GEMM + SiLU-and-mul vs gated GEMV", x, qweight, gemm_then_silu,
        lambda words: lambda: w4a16_gemv(x, words, scales, zeros, group, bias, validate=False, gated=True),
        ("tensor-core GEMM + SiLU-and-mul", "gated GEMV"))


def _random_layer(k: int, n: int, group: int, dtype: torch.dtype, device: torch.device, with_zeros: bool,
                  gen: torch.Generator):
    """(qweight, scales, zeros or None, bias) of a random layer, for the kernels' self-tests."""
    raw = torch.randint(0, 256, (k // 8, n, 4), generator=gen, dtype=torch.uint8)
    qweight = raw.view(torch.int32).reshape(k // 8, n).to(device)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.002).to(device=device, dtype=dtype)
    zeros = torch.randint(-8, 8, (k // group, n), generator=gen).to(device=device, dtype=dtype) if with_zeros else None
    bias = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    return qweight, scales, zeros, bias


def _gemm_self_test(device: torch.device, dtype: torch.dtype, with_zeros: bool) -> None:
    from mllm_kernel.cuda.jit.w4a16_gemm import w4a16_gemm
    from mllm_kernel.cuda.jit.w4a16_reference import w4a16_gemm_reference

    gen = torch.Generator().manual_seed(0)
    k, n, group = 1024, 132, 64  # a partial column tile; 2 K splits of 8 tiles each
    qweight, scales, zeros, bias = _random_layer(k, n, group, dtype, device, with_zeros, gen)
    # A partial row tile; two row tiles, the second partial (on SM 9.0 these and 200 rows run the
    # warpgroup kernel, 64- and 128-row tiles: mllm_kernel's w4a16_gemm picks it by rows).
    for rows in (GEMM_MIN_M, 70, 200):
        x = torch.randn(rows, k, generator=gen).to(device=device, dtype=dtype)
        got = w4a16_gemm(x, qweight, scales, zeros, group, bias, splits=2).double()
        want = w4a16_gemm_reference(x, qweight, scales, zeros, group, bias).double()
        error = ((got - want).abs().max() / want.abs().max()).item()
        if not error < 2e-2:  # also catches NaN
            raise RuntimeError(f"{rows} rows: results differ from the PyTorch reference (relative error {error:.3g})")


def prepare_w4a16_gemm(device: torch.device, dtype: torch.dtype, with_zeros: bool) -> bool:
    """Build, self-test and allocate the split-K workspace of the CUDA tensor-core GEMM for this
    device, dtype and zero-point mode, once; False, with a warning, when it cannot be used."""
    from pymllm.layers.kernels.gemv_dispatch import prepare_kernel

    kind = "W4A16 tensor-core GEMM" + (" (zero points)" if with_zeros else "")
    return prepare_kernel(kind, device, dtype, lambda: _gemm_self_test(device, dtype, with_zeros))


def gemm_fits(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
              group: int, bias: Optional[torch.Tensor]) -> bool:
    """The CUDA tensor-core GEMM takes these arguments here (GEMM_MIN_M..GEMM_MAX_M rows, dtypes,
    layouts, alignment) and is ready."""
    if not (x.is_cuda and x.dim() == 2 and GEMM_MIN_M <= x.shape[0] <= GEMM_MAX_M):
        return False
    try:
        from mllm_kernel.cuda.jit.w4a16_gemm import supported
    except ImportError:  # mllm_kernel or tvm_ffi missing
        return False
    return supported(x, qweight, scales, zeros, group, bias) and prepare_w4a16_gemm(x.device, x.dtype,
                                                                                  zeros is not None)


def _gemv_self_test(device: torch.device, dtype: torch.dtype, with_zeros: bool, gated: bool = False) -> None:
    from mllm_kernel.cuda.jit.w4a16_gemv import w4a16_gemv
    from mllm_kernel.cuda.jit.w4a16_reference import w4a16_gemv_gated_reference, w4a16_gemv_reference

    gen = torch.Generator().manual_seed(0)
    k, n, group = 512, 104, 64  # a partial column tile (of each half when gated), two K splits
    qweight, scales, zeros, bias = _random_layer(k, n, group, dtype, device, with_zeros, gen)
    reference = w4a16_gemv_gated_reference if gated else w4a16_gemv_reference
    for rows in (1, 3, 11, 37):  # the one-row kernel; one row group; the wide kernel's two; three chunks of 16
        x = torch.randn(rows, k, generator=gen).to(device=device, dtype=dtype)
        got = w4a16_gemv(x, qweight, scales, zeros, group, bias, splits=2, gated=gated).double()
        want = reference(x, qweight, scales, zeros, group, bias).double()
        error = ((got - want).abs().max() / want.abs().max()).item()
        if not error < 2e-2:  # also catches NaN
            raise RuntimeError(f"{rows} rows: results differ from the PyTorch reference (relative error {error:.3g})")


def prepare_w4a16_gemv(device: torch.device, dtype: torch.dtype, with_zeros: bool, gated: bool = False) -> bool:
    """Build, self-test and allocate the split-K workspace of the CUDA GEMV (``gated``: its form
    with the SiLU-and-mul as the epilogue) for this device, dtype and zero-point mode, once
    (``gemv_dispatch.prepare_kernel``). ``WNA16Scheme`` calls it while the model loads. False,
    with a warning, when it cannot be used."""
    from pymllm.layers.kernels.gemv_dispatch import prepare_kernel

    kind = "W4A16 " + ("gated GEMV" if gated else "GEMV") + (" (zero points)" if with_zeros else "")
    return prepare_kernel(kind, device, dtype, lambda: _gemv_self_test(device, dtype, with_zeros, gated))


def gemv_fits(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
              group: int, bias: Optional[torch.Tensor], gated: bool = False) -> bool:
    """The CUDA GEMV (or its gated form) takes these arguments here (rows, dtypes, layouts,
    alignment) and is ready."""
    if not (x.is_cuda and x.dim() == 2 and 1 <= x.shape[0] <= GEMV_MAX_M):
        return False
    try:
        from mllm_kernel.cuda.jit.w4a16_gemv import supported
    except ImportError:  # mllm_kernel or tvm_ffi missing
        return False
    return (supported(x, qweight, scales, zeros, group, bias, gated)
            and prepare_w4a16_gemv(x.device, x.dtype, zeros is not None, gated))


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) -> [M, N] in x.dtype, W in the runtime layout of ``repack_wna16``."""
    m, k = x.shape
    n = qweight.shape[1]
    sm80 = cuda_capability(x.device) >= (8, 0)  # (0, 0) off CUDA
    gemv_ok = sm80 and gemv_fits(x, qweight, scales, zeros, group, bias)  # it checks the rows too
    gemm_ok = sm80 and gemm_fits(x, qweight, scales, zeros, group, bias)  # so does this
    # The Triton capability check only matters where the GEMV does not run (every decode call
    # would otherwise pay for it).
    triton_ok = sm80 and not gemv_ok and fast_path_supported(x, n, k, group)
    choice = choose_w4a16_kernel(
        m, sm80, gemv_ok, triton_ok, lambda: fused_measured_faster(x, qweight, scales, zeros, group, bias),
        gemm_ok, lambda rival: gemm_measured_faster(x, qweight, scales, zeros, group, bias, rival))
    if choice == "reference":
        return w4a16_linear_reference(x, qweight, scales, zeros, group, bias)
    return _kernel_call(choice, x, qweight, scales, zeros, group, bias)()  # gemv_fits / gemm_fits validated


def w4a16_swiglu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    bias: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """``silu(g) * u`` of ``g | u = x @ W^T (+ bias)`` for a stacked [gate; up] weight, as the gated
    CUDA GEMV (one kernel: the SiLU-and-mul is its epilogue) where the GEMV would run (M <= 64 on
    SM80+, the kernel ready); None otherwise (the caller runs ``w4a16_linear`` and the SiLU-and-mul).
    The result equals that pair's bit for bit."""
    # gemv_fits checks the rows (1..GEMV_MAX_M), the device and the arguments.
    if cuda_capability(x.device) < (8, 0) or not gemv_fits(x, qweight, scales, zeros, group, bias, gated=True):
        return None
    if gemm_fits(x, qweight, scales, zeros, group, bias) and gemm_swiglu_measured_faster(
            x, qweight, scales, zeros, group, bias):
        return None  # w4a16_linear takes the tensor-core GEMM, then the SiLU-and-mul runs
    from mllm_kernel.cuda.jit.w4a16_gemv import w4a16_gemv

    return w4a16_gemv(x, qweight, scales, zeros, group, bias, validate=False, gated=True)


# A deferred RMSNorm between two one-row GEMVs (pymllm.layers.deferred_norm): the producer's
# epilogue writes the next input and the partial sums of squares, the consumer scales by 1 / rms.
def _one_row_gemv(like: torch.Tensor) -> bool:
    return like.is_cuda and like.dim() == 2 and like.shape[0] == 1 and cuda_capability(like.device) >= (8, 0)


def w4a16_takes_deferred_norm(like: torch.Tensor, k: int, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                              gated: bool) -> bool:
    """Whether ``w4a16_normed`` runs for a one-row input of ``like``'s dtype and device and K columns
    (checked before the producer defers; ``w4a16_normed`` checks the actual input again)."""
    if not _one_row_gemv(like) or like.dtype != scales.dtype:
        return False
    try:
        from mllm_kernel.cuda.jit.w4a16_gemv import MAX_NORM_TILES, norm_tiles
    except ImportError:  # mllm_kernel or tvm_ffi missing
        return False
    return norm_tiles(k) <= MAX_NORM_TILES and prepare_w4a16_gemv(like.device, like.dtype, zeros is not None, gated)


def w4a16_add_norm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    bias: Optional[torch.Tensor],
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
):
    """The producer: ``x @ W (+ bias) + residual`` as a ``DeferredNorm`` of ``norm_weight``, from one
    kernel (the one-row GEMV's epilogue), or None where that kernel cannot take these arguments."""
    if not (_one_row_gemv(x) and gemv_fits(x, qweight, scales, zeros, group, bias)):
        return None  # gemv_fits found mllm_kernel importable
    from mllm_kernel.cuda.jit.w4a16_gemv import add_norm_supported, w4a16_gemv_add_norm

    if not add_norm_supported(x, qweight, residual, norm_weight):
        return None

    from pymllm.layers.deferred_norm import DeferredNorm

    scaled, h, sumsq = w4a16_gemv_add_norm(x, qweight, scales, zeros, group, residual, norm_weight, bias,
                                           validate=False)
    return DeferredNorm(scaled, h, sumsq, eps)


def w4a16_normed(pending, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group: int,
                 bias: Optional[torch.Tensor], gated: bool = False) -> Optional[torch.Tensor]:
    """The consumer: ``x @ W (+ bias)`` of x = norm(h) of a ``DeferredNorm`` (``gated``: its
    SiLU-and-mul), from ``pending.scaled`` and the partial sums in one kernel; None where the GEMV
    cannot take them (the caller then materializes the norm)."""
    if not (_one_row_gemv(pending.scaled) and gemv_fits(pending.scaled, qweight, scales, zeros, group, bias, gated)):
        return None
    from mllm_kernel.cuda.jit.w4a16_gemv import w4a16_gemv_normed

    # The sums' count is the producer's tiles over this K, which takes_deferred_norm bounded.
    return w4a16_gemv_normed(pending.scaled, qweight, scales, zeros, group, pending.sumsq, pending.eps, bias,
                             gated=gated, validate=False)
