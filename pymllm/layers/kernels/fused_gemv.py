"""Decode GEMVs that also compute their input: RMSNorm (with the residual add) or SiLU-and-mul.

A decode step of a small model is a chain of ~10 short kernels per layer, each costing a few
microseconds of launch and ramp-up no matter how little it reads (Qwen3-0.6B at batch 1: RMSNorm
1.5 us, SiLU-and-mul 1.2 us, the GEMVs 3-5 us each on an H200). mllm_kernel's prologue GEMVs fold
the two RMSNorms and the SiLU-and-mul into the GEMV that consumes them, and the W8A8 ones also
quantize the activation per token, which removes the quantization kernel in front of every int8
projection.

Whether fusing pays is measured, not assumed: each fused kernel recomputes its whole input row in
every block, which wins over a separate launch for one row of a small model (Qwen3-0.6B, H200:
qkv 5.8 -> 5.5 us, gate_up 6.7 -> 6.3 us) but loses for several rows or the 8B W8A8 layers (gate_up
29.0 -> 30.5 us; mllm-kernel/benchmarks/bench_gemv.py --fused). So a fused kernel runs only where
(1) ``gemv_dispatch.CHOOSER`` picked the plain GEMV for the same (kind, N, K, rows), and (2) a
second measured decision for (prologue, kind, N, K, rows) found the fused kernel >= 3 % faster
than the separate prologue kernel + GEMV. Both are measured outside CUDA-graph captures (the
graph runner's eager warm-ups); until they exist these functions return None and the caller runs
the separate ops. Each fused kernel is also built and checked against its PyTorch reference once
per (device, dtype) while the model loads (``prepare_fused_gemvs``); one that fails is never used.

The SiLU-and-mul can also be the gate/up GEMV's epilogue (``dense_swiglu_linear``): that kernel
recomputes nothing, so it can win for long rows too; it is measured the same way, against the
gate/up GEMV followed by the SiLU-and-mul kernel.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from pymllm.layers.kernels.gemv_dispatch import CHOOSER, GEMV_MAX_ROWS, choice_key, prepare_kernel, tiling_of


def _self_test(kind: str, device: torch.device, dtype: torch.dtype) -> None:
    from mllm_kernel.cuda.jit import gemv_kernels as kernels

    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x, residual, norm_weight = rand(3, 512), rand(3, 512), rand(512)
    bias = rand(96)

    def close(got, want, tol=2.0**-6):
        return bool(((got.float() - want.float()).abs() <= tol * (want.float().abs() + 1)).all())

    if kind == "swiglu":
        w = rand(192, 512, scale=1 / 16)
        bias2 = rand(192)
        got, want = kernels.gemv_gated_silu(x, w, bias2), kernels.gemv_gated_silu_reference(x, w, bias2)
        ok = close(got, want, 2.0**-5)
    elif kind == "rmsnorm":
        w = rand(96, 512, scale=1 / 16)
        (y, res), (y_ref, res_ref) = (
            kernels.rmsnorm_gemv(x, residual, norm_weight, 1e-6, w, bias),
            kernels.rmsnorm_gemv_reference(x, residual, norm_weight, 1e-6, w, bias),
        )
        ok = close(y, y_ref) and torch.equal(res, res_ref)
    elif kind == "silu_mul":
        w = rand(96, 256, scale=1 / 16)
        ok = close(kernels.silu_mul_gemv(x, w, bias), kernels.silu_mul_gemv_reference(x, w, bias))
    else:  # W8A8 with the quantization (and, tested here, the RMSNorm) in the kernel
        w = torch.randint(-128, 128, (96, 512), generator=gen, dtype=torch.int8).to(device)
        w_scale = (torch.rand(96, generator=gen) / 100).to(device)
        y = kernels.gemv_w8a8_dynamic(x, w, w_scale, dtype, bias)
        ok = close(y, kernels.gemv_w8a8_dynamic_reference(x, w, w_scale, dtype, bias), 2.0**-7)
        (y, res), (y_ref, res_ref) = (
            kernels.gemv_w8a8_dynamic(x, w, w_scale, dtype, bias, prologue="rmsnorm", residual=residual,
                                      norm_weight=norm_weight),
            kernels.gemv_w8a8_dynamic_reference(x, w, w_scale, dtype, bias, prologue="rmsnorm",
                                                residual=residual, norm_weight=norm_weight),
        )
        # One ulp of the normalised activation can move an int8 step: compare loosely here; the
        # kernel tests check exactness on the quantized path itself.
        ok = ok and close(y, y_ref, 2.0**-4) and torch.equal(res, res_ref)
        w_half = w[:, :256].contiguous()
        y = kernels.gemv_w8a8_dynamic(x, w_half, w_scale, dtype, bias, prologue="silu_mul")
        y_ref = kernels.gemv_w8a8_dynamic_reference(x, w_half, w_scale, dtype, bias, prologue="silu_mul")
        ok = ok and close(y, y_ref, 2.0**-7)
    if not ok:
        raise RuntimeError("results differ from the PyTorch reference")


# (kind, device, dtype) -> prepare_fused_gemvs' settled answer: the fused entries ask on every call.
_fused_ready: Dict[Tuple[str, torch.device, torch.dtype], bool] = {}


def prepare_fused_gemvs(kind: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Build and self-test the fused GEMVs of ``kind`` ("dense": RMSNorm and SiLU-and-mul
    prologues, the gated SwiGLU GEMV; "w8a8": the dynamic-quantization GEMV with its prologues)
    once per device and dtype."""
    key = (kind, device, dtype)
    ready = _fused_ready.get(key)
    if ready is not None:
        return ready
    kinds = ("rmsnorm", "silu_mul", "swiglu") if kind == "dense" else ("w8a8_dynamic",)
    ready = all(
        [prepare_kernel(f"{k} GEMV", device, dtype, lambda k=k: _self_test(k, device, dtype)) for k in kinds]
    )
    # A "no" from inside a CUDA-graph capture is not final (prepare_kernel builds nothing there).
    if ready or not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        _fused_ready[key] = ready
    return ready


def _gemv_chosen(kind: str, x: torch.Tensor, weight_nk: torch.Tensor) -> bool:
    """Whether the measured decision for (kind, N, K, rows) exists and picked the GEMV (x of a
    "silu_mul" prologue is twice as wide as K; only its rows count)."""
    return CHOOSER.choices.get(choice_key(kind, x, weight_nk, x.dtype), False)


def _plain_tiling(kind: str, x: torch.Tensor, weight_nk: torch.Tensor) -> int:
    """The tiling measured for the plain GEMV of (kind, N, K, rows): the separate form runs it."""
    return CHOOSER.tiling(choice_key(kind, x, weight_nk, x.dtype))


def _fused_wins(prologue: str, kind: str, x: torch.Tensor, weight_nk: torch.Tensor,
                fused: Callable[[torch.Tensor], object], separate: Callable[[torch.Tensor], object]) -> bool:
    """The measured fused-or-separate decision for (prologue, kind, N, K, rows); fused(w) and
    separate(w) run the two forms on weight w with the caller's inputs."""
    key = choice_key(f"{prologue}+{kind}", x, weight_nk, x.dtype)

    def make_call(impl: str, w: torch.Tensor) -> Callable:
        return (lambda: fused(w)) if impl == "gemv" else (lambda: separate(w))

    return CHOOSER.use_gemv(key, weight_nk, make_call, labels=("fused", "separate"))


def _fits(x: torch.Tensor, weight_nk: torch.Tensor, bias: Optional[torch.Tensor], k_multiple: int) -> bool:
    return (
        x.is_cuda
        and x.dim() == 2
        and x.is_contiguous()
        and 1 <= x.shape[0] <= GEMV_MAX_ROWS
        and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
        and weight_nk.is_contiguous()
        and weight_nk.shape[1] % k_multiple == 0
        and x.data_ptr() % 16 == 0
        and weight_nk.data_ptr() % 16 == 0
    )


def _norm_inputs_ok(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor) -> bool:
    return (
        norm_weight.dtype == x.dtype
        and norm_weight.is_contiguous()
        and norm_weight.data_ptr() % 16 == 0
        and (residual is None or (residual.shape == x.shape and residual.is_contiguous() and residual.dtype == x.dtype
                                  and residual.data_ptr() % 16 == 0))
    )


def _normed(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x [+ residual]) by the separate kernels (what a fused prologue is measured against)."""
    from pymllm.layers.fused_ops import fused_add_rms_norm, rms_norm

    return rms_norm(x, norm_weight, eps) if residual is None else fused_add_rms_norm(x, residual, norm_weight, eps)[0]


def _with_residual(x: torch.Tensor, fused_out: Tuple[torch.Tensor, Optional[torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fused RMSNorm GEMV's (y, x + residual), where x itself is the residual when there was none."""
    y, residual_out = fused_out
    return y, (x if residual_out is None else residual_out)


def dense_rmsnorm_linear(
    x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, bias: Optional[torch.Tensor],
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(linear(RMSNorm(x [+ residual])), x [+ residual])`` in one kernel, or None when the
    plain path should run (not a decode-sized input, the GEMM measured faster, no kernel)."""
    if not (
        _fits(x, weight, bias, 8)
        and weight.dtype == x.dtype
        and _norm_inputs_ok(x, residual, norm_weight)
        and _gemv_chosen("dense", x, weight)
        and prepare_fused_gemvs("dense", x.device, x.dtype)
    ):
        return None
    from mllm_kernel.cuda.jit.gemv_kernels import gemv, rmsnorm_gemv

    if not _fused_wins("rmsnorm", "dense", x, weight, lambda w: rmsnorm_gemv(x, residual, norm_weight, eps, w, bias),
                       lambda w: gemv(_normed(x, residual, norm_weight, eps), w, bias,
                                      _tiling=_plain_tiling("dense", x, weight))):
        return None
    return _with_residual(x, rmsnorm_gemv(x, residual, norm_weight, eps, weight, bias))


def dense_silu_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``linear(silu(x[:, :K]) * x[:, K:])`` in one kernel, or None (see dense_rmsnorm_linear)."""
    if not (
        _fits(x, weight, bias, 8)
        and weight.dtype == x.dtype
        and x.shape[1] == 2 * weight.shape[1]
        and _gemv_chosen("dense", x, weight)
        and prepare_fused_gemvs("dense", x.device, x.dtype)
    ):
        return None
    from mllm_kernel.cuda.jit.gemv_kernels import gemv, silu_mul_gemv

    from pymllm.layers.fused_ops import silu_and_mul

    if not _fused_wins("silu_mul", "dense", x, weight, lambda w: silu_mul_gemv(x, w, bias),
                       lambda w: gemv(silu_and_mul(x), w, bias, _tiling=_plain_tiling("dense", x, weight))):
        return None
    return silu_mul_gemv(x, weight, bias)


def dense_swiglu_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``silu(g) * u`` with ``g | u = linear(x)`` of a stacked gate/up weight [2N, K], in one
    kernel (the SiLU-and-mul as the GEMV's epilogue), or None (see dense_rmsnorm_linear).

    The fused kernel is timed at each of its tilings against the plain GEMV (its measured
    tiling) followed by the SiLU-and-mul kernel, and runs at its fastest tiling where that is
    >= 3 % faster."""
    if not (
        _fits(x, weight, bias, 8)
        and weight.dtype == x.dtype
        and weight.shape[0] % 2 == 0
        and _gemv_chosen("dense", x, weight)
        and prepare_fused_gemvs("dense", x.device, x.dtype)
    ):
        return None
    from mllm_kernel.cuda.jit.gemv_kernels import GATED_TILINGS, gemv, gemv_gated_silu

    from pymllm.layers.fused_ops import silu_and_mul

    plain = _plain_tiling("dense", x, weight)

    def make_call(impl: str, w: torch.Tensor) -> Callable:
        if impl == "gemm":
            return lambda: silu_and_mul(gemv(x, w, bias, _tiling=plain))
        return lambda: gemv_gated_silu(x, w, bias, _tiling=tiling_of(impl))

    key = choice_key("swiglu+dense", x, weight, x.dtype)
    if not CHOOSER.use_gemv(key, weight, make_call, labels=("fused", "separate"), tilings=GATED_TILINGS):
        return None
    return gemv_gated_silu(x, weight, bias, _tiling=CHOOSER.tiling(key))


def w8a8_fused_linear(
    x: torch.Tensor, weight_nk: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
    prologue: str = "none", residual: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
):
    """The W8A8 decode GEMV from unquantized activations (quantized per token in the kernel),
    optionally behind an RMSNorm or SiLU-and-mul prologue: y, or (y, residual) for "rmsnorm";
    None when the caller's path should run."""
    k_width = 2 if prologue == "silu_mul" else 1
    if not (
        _fits(x, weight_nk, bias, 16)
        and weight_nk.dtype == torch.int8
        and x.shape[1] == k_width * weight_nk.shape[1]
        and w_scale.is_contiguous()
        and (prologue != "rmsnorm" or _norm_inputs_ok(x, residual, norm_weight))
        and _gemv_chosen("w8a8", x, weight_nk)
        and prepare_fused_gemvs("w8a8", x.device, x.dtype)
    ):
        return None
    from mllm_kernel.cuda.jit.gemv_kernels import gemv_w8a8, gemv_w8a8_dynamic

    from pymllm.layers.fused_ops import silu_and_mul
    from pymllm.quantization.kernels.int8_activation_triton import per_token_quant_int8, prologue_quant_int8

    norm_args = {"residual": residual, "norm_weight": norm_weight, "eps": eps} if prologue == "rmsnorm" else {}

    def fused(w):
        return gemv_w8a8_dynamic(x, w, w_scale, x.dtype, bias, prologue=prologue, **norm_args)

    def separate(w):
        # What the scheme runs when the fused kernel is not chosen (W8A8Int8Scheme._behind_prologue):
        # the prologue quantizes its own output where it can.
        quantized = None if prologue == "none" else prologue_quant_int8(x, prologue, residual, norm_weight, eps)
        if quantized is not None:
            q, scale = quantized[0], quantized[1]
        elif prologue == "rmsnorm":
            q, scale = per_token_quant_int8(_normed(x, residual, norm_weight, eps))
        else:
            q, scale = per_token_quant_int8(silu_and_mul(x) if prologue == "silu_mul" else x)
        return gemv_w8a8(q, scale, w, w_scale, x.dtype, bias, _tiling=_plain_tiling("w8a8", x, weight_nk))

    if not _fused_wins(prologue, "w8a8", x, weight_nk, fused, separate):
        return None
    return _with_residual(x, fused(weight_nk)) if prologue == "rmsnorm" else fused(weight_nk)

