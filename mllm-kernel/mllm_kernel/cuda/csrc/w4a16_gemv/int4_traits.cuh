// The 16-bit activation types' side of the W4A16 kernels (w4a16_gemv, w4a16_gemm): unpacking a
// word of 8 int4 weights into 16-bit pairs, the m16n8k16 tensor-core MMA, and conversions.
#pragma once

#include "common.cuh"

namespace mllm_kernel {
namespace w4a16_gemv_detail {

// (a & kMask) | magic as one LOP3: SASS takes one immediate per LOP3, so the magic comes in a
// register (hoisted out of the loop); written in C, the compiler emits an AND and an OR.
template <uint32_t kMask>
__device__ __forceinline__ uint32_t mask_or(uint32_t a, uint32_t magic) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "n"(kMask), "r"(magic));
  return d;
}

template <typename T>
struct Traits;

template <>
struct Traits<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // fp16 1024 in both halves
  static constexpr uint32_t kOnes = 0x3C003C00u;
  static constexpr float kBias = 0.f;  // unpack yields q - 8 itself
  // OR-ing a nibble q into the mantissa of 1024 gives 1024 + q, and fma(h, 1, -1032) = q - 8 exactly.
  // The nibble at bits 4..7 gives 1024 + 16q, and fma(h, 1/16, -72) = q - 8: one shift per word.
  static __device__ __forceinline__ void unpack(uint32_t w, uint32_t magic, uint32_t (&pairs)[4]) {
    const uint32_t hi = w >> 8;
    pairs[0] = fma2(mask_or<0x000F000Fu>(w, magic), 0x3C003C00u, 0xE408E408u);
    pairs[1] = fma2(mask_or<0x00F000F0u>(w, magic), 0x2C002C00u, 0xD480D480u);
    pairs[2] = fma2(mask_or<0x000F000Fu>(hi, magic), 0x3C003C00u, 0xE408E408u);
    pairs[3] = fma2(mask_or<0x00F000F0u>(hi, magic), 0x2C002C00u, 0xD480D480u);
  }
  static __device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const float* c, uint32_t a0, uint32_t a1,
                                             uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  }
  static __device__ __forceinline__ float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  static __device__ __forceinline__ uint16_t from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <>
struct Traits<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 128 in both halves
  static constexpr uint32_t kOnes = 0x3F803F80u;
  // bf16 has 7 mantissa bits, so only bits 0..3 can take a nibble (the others are shifted down):
  // 128 + q exactly. The MMA takes 128 + q as it is and the fold subtracts 136 * sum(x) in fp32,
  // one FMA per output instead of one HFMA2 per weight pair; the cancellation (at most ~30x over
  // a 64-k window) costs ~1e-5 relative, far below bf16's rounding.
  static constexpr float kBias = 136.f;
  static __device__ __forceinline__ void unpack(uint32_t w, uint32_t magic, uint32_t (&pairs)[4]) {
    pairs[0] = mask_or<0x000F000Fu>(w, magic);
    pairs[1] = mask_or<0x000F000Fu>(w >> 4, magic);
    pairs[2] = mask_or<0x000F000Fu>(w >> 8, magic);
    pairs[3] = mask_or<0x000F000Fu>(w >> 12, magic);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const float* c, uint32_t a0, uint32_t a1,
                                             uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  }
  static __device__ __forceinline__ float to_float(uint16_t bits) { return __uint_as_float(uint32_t(bits) << 16); }
  static __device__ __forceinline__ uint16_t from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

__device__ __forceinline__ uint32_t word(const uint4& v, int c) {
  return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w;
}

// half of a packed pair (c even: low half) of scales/zeros, as float.
template <typename T>
__device__ __forceinline__ float meta_at(const uint2& v, int c) {
  const uint32_t pair = c < 2 ? v.x : v.y;
  return Traits<T>::to_float(static_cast<uint16_t>((c & 1) ? pair >> 16 : pair & 0xFFFFu));
}

}  // namespace w4a16_gemv_detail
}  // namespace mllm_kernel
