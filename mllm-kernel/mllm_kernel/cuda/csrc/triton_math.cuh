// The float32 instructions pymllm's Triton kernels emit for exp (ex2.approx of x * log2 e),
// division (div.full) and 1 / sqrt (rsqrt.approx), and the SiLU-and-mul built from them with
// _silu_and_mul_kernel's rounding. CUDA kernels that compute what a Triton kernel would have
// computed in a separate launch (a fused prologue or epilogue) use these, so the two agree bit for bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mllm_kernel {

__device__ __forceinline__ float triton_exp(float x) {
  float r;
  asm("ex2.approx.f32 %0, %1;" : "=f"(r) : "f"(__fmul_rn(x, 1.4426950408889634f)));
  return r;
}
__device__ __forceinline__ float triton_div(float a, float b) {
  float r;
  asm("div.full.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float triton_rsqrt(float x) {
  float r;
  asm("rsqrt.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// v rounded to T (fp16 or bf16, round to nearest even) and back to float.
template <typename T>
__device__ __forceinline__ float round_to_dtype(float v);
template <>
__device__ __forceinline__ float round_to_dtype<__half>(float v) {
  return __half2float(__float2half_rn(v));
}
template <>
__device__ __forceinline__ float round_to_dtype<__nv_bfloat16>(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

// T(T(silu(g)) * u) for g and u already in T: _silu_and_mul_kernel's rounding and instructions.
template <typename T>
__device__ __forceinline__ float silu_mul_rounded(float g, float u) {
  const float silu = triton_div(g, __fadd_rn(1.0f, triton_exp(-g)));
  return round_to_dtype<T>(__fmul_rn(round_to_dtype<T>(silu), u));
}

}  // namespace mllm_kernel
