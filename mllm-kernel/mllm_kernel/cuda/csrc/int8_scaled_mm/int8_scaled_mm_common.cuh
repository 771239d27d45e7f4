// Shared by the CUTLASS int8 GEMMs: argument checks and the TVM-FFI <-> CUTLASS type mapping.
//
// out[m, n] = (sum_k a[m, k] * b[k, n]) * scale_a[m] * scale_b[n] (+ bias[n])
//   a: int8 [M, K] row-major (lda = stride(0)), b: int8 [K, N] column-major (ldb = stride(1)),
//   scale_a: float32 [M] (or [M, 1]), scale_b: float32 [N] (or [1, N]), bias: out dtype [N],
//   out: fp16/bf16 [M, N] contiguous. Accumulation is exact (int32); the epilogue is float32.
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>

#include "common.cuh"

namespace mllm_kernel {
namespace int8_scaled_mm_detail {

template <typename T>
struct CutlassType;
template <>
struct CutlassType<__half> {
  using type = cutlass::half_t;
};
template <>
struct CutlassType<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};

struct Problem {
  int m = 0;
  int n = 0;
  int k = 0;
  int64_t lda = 0;
  int64_t ldb = 0;
  const int8_t* a = nullptr;
  const int8_t* b = nullptr;
  const float* scale_a = nullptr;
  const float* scale_b = nullptr;
  const void* bias = nullptr;
  void* out = nullptr;
  int device = 0;
  cudaStream_t stream = nullptr;
};

inline bool is_dtype(const TensorView& t, uint8_t code, int bits) {
  return t.dtype().code == code && t.dtype().bits == bits && t.dtype().lanes == 1;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// The Python wrapper reports user-facing errors first; these checks keep the CUTLASS
// arguments (alignment of 16 bytes for int8 rows, 8 elements for 16-bit outputs) valid
// for direct callers too.
inline Problem make_problem(const TensorView& out, const TensorView& a, const TensorView& b, const TensorView& scale_a,
                            const TensorView& scale_b, const Optional<TensorView>& bias, uint8_t out_code) {
  TVM_FFI_CHECK(a.ndim() == 2 && is_dtype(a, kDLInt, 8), TypeError) << "a must be a 2-D int8 tensor";
  TVM_FFI_CHECK(b.ndim() == 2 && is_dtype(b, kDLInt, 8), TypeError) << "b must be a 2-D int8 tensor";
  Problem p;
  p.m = static_cast<int>(a.size(0));
  p.k = static_cast<int>(a.size(1));
  p.n = static_cast<int>(b.size(1));
  TVM_FFI_CHECK(b.size(0) == p.k, ValueError) << "a is [M, K] and b must be [K, N]; got K " << p.k << " vs "
                                              << b.size(0);
  TVM_FFI_CHECK(a.size(1) <= 1 || a.stride(1) == 1, ValueError) << "a must be row-major";
  TVM_FFI_CHECK(b.size(0) <= 1 || b.stride(0) == 1, ValueError) << "b must be column-major";
  p.lda = p.m > 1 ? a.stride(0) : p.k;
  p.ldb = p.n > 1 ? b.stride(1) : p.k;
  TVM_FFI_CHECK(p.k % 16 == 0 && p.lda % 16 == 0 && p.ldb % 16 == 0, ValueError)
      << "K and the leading dimensions of a and b must be multiples of 16";
  TVM_FFI_CHECK(p.n % 8 == 0, ValueError) << "N must be a multiple of 8";
  TVM_FFI_CHECK(is_dtype(scale_a, kDLFloat, 32) && scale_a.numel() == p.m && scale_a.IsContiguous(), ValueError)
      << "scale_a must be a contiguous float32 tensor of M elements";
  TVM_FFI_CHECK(is_dtype(scale_b, kDLFloat, 32) && scale_b.numel() == p.n && scale_b.IsContiguous(), ValueError)
      << "scale_b must be a contiguous float32 tensor of N elements";
  TVM_FFI_CHECK(out.ndim() == 2 && out.size(0) == p.m && out.size(1) == p.n && out.IsContiguous() &&
                    is_dtype(out, out_code, 16),
                ValueError)
      << "out must be a contiguous [M, N] tensor of the output dtype";
  p.a = reinterpret_cast<const int8_t*>(byte_ptr(a));
  p.b = reinterpret_cast<const int8_t*>(byte_ptr(b));
  p.scale_a = reinterpret_cast<const float*>(byte_ptr(scale_a));
  p.scale_b = reinterpret_cast<const float*>(byte_ptr(scale_b));
  p.out = byte_ptr(out);
  if (bias.has_value()) {
    const TensorView& bv = bias.value();
    TVM_FFI_CHECK(is_dtype(bv, out_code, 16) && bv.numel() == p.n && bv.IsContiguous(), ValueError)
        << "bias must be a contiguous tensor of N elements in the output dtype";
    p.bias = byte_ptr(bv);
    TVM_FFI_CHECK(aligned16(p.bias), ValueError) << "bias must be 16-byte aligned";
  }
  TVM_FFI_CHECK(aligned16(p.a) && aligned16(p.b) && aligned16(p.out) && aligned16(p.scale_b), ValueError)
      << "a, b, scale_b and out must be 16-byte aligned";
  p.device = a.device().device_id;
  p.stream = current_stream(a);
  return p;
}

template <typename OutT>
constexpr uint8_t dl_code() {
  return std::is_same_v<OutT, __nv_bfloat16> ? static_cast<uint8_t>(kDLBfloat) : static_cast<uint8_t>(kDLFloat);
}

inline void check_cutlass(cutlass::Status status, const char* what) {
  TVM_FFI_CHECK(status == cutlass::Status::kSuccess, RuntimeError)
      << what << " failed: " << cutlass::cutlassGetStatusString(status);
}

}  // namespace int8_scaled_mm_detail
}  // namespace mllm_kernel
