// Shared helpers for mllm_kernel CUDA kernels: host-side launch utilities and
// vector types for wide memory accesses.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/extra/cuda/base.h>
#include <tvm/ffi/extra/cuda/device_guard.h>
#include <tvm/ffi/optional.h>

namespace mllm_kernel {

using tvm::ffi::Optional;
using tvm::ffi::TensorView;

// TVM-FFI sets the caller's current stream (torch.cuda.current_stream() for
// torch tensors) before each call, so launches follow torch's stream
// semantics and are captured by CUDA graphs.
inline cudaStream_t current_stream(const TensorView& t) {
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(t.device().device_type, t.device().device_id));
}

// Launch errors (bad configuration, missing sm arch in the fatbin) surface
// here; asynchronous execution errors show up at the next synchronisation.
inline void check_launch() { TVM_FFI_CHECK_CUDA_ERROR(cudaGetLastError()); }

// DLPack allows a byte offset on top of the data pointer; torch folds it into
// the pointer, other producers may not.
inline char* byte_ptr(const TensorView& t) {
  return static_cast<char*>(t.data_ptr()) + t.byte_offset();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Unsigned integer type of exactly kBytes bytes, used to move kBytes per access.
template <int kBytes>
struct VecOf;
template <>
struct VecOf<16> {
  using type = uint4;
};
template <>
struct VecOf<8> {
  using type = uint2;
};
template <>
struct VecOf<4> {
  using type = uint32_t;
};
template <>
struct VecOf<2> {
  using type = uint16_t;
};
template <>
struct VecOf<1> {
  using type = uint8_t;
};

// One 16-byte load that bypasses L1: for data read exactly once (decode weights), so that
// what is reused (activations, scales) stays in L1.
__device__ __forceinline__ uint4 load_streaming(const void* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

// The device's SM count, cached per device: the attribute query is a driver call on every decode
// step otherwise (the GEMVs' tilings, the W4A16 one-wave test, the persistent int8 GEMM).
inline int sm_count(int device) {
  static int counts[64] = {0};
  const bool cached = device >= 0 && device < 64;
  if (cached && counts[device] != 0) return counts[device];
  int count = 0;
  TVM_FFI_CHECK_CUDA_ERROR(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (cached) counts[device] = count;
  return count;
}

// Largest access width in {16, 8, 4, 2, 1} bytes that divides every value
// given (addresses, byte strides, byte lengths).
inline int widest_access(std::initializer_list<uint64_t> values) {
  uint64_t bits = 16;
  for (uint64_t v : values) bits |= v;
  return static_cast<int>(bits & (~bits + 1));  // lowest set bit
}

}  // namespace mllm_kernel
