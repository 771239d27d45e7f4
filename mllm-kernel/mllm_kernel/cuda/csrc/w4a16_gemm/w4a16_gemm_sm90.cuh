// w4a16_gemm_sm90's host side (compiled for sm_90a): the shared checks of w4a16_gemm.cuh and the
// launch of the warpgroup-MMA kernel described in w4a16_gemm_sm90_kernel.cuh.
#pragma once

#include "w4a16_gemm/w4a16_gemm.cuh"
#include "w4a16_gemm/w4a16_gemm_sm90_kernel.cuh"

namespace mllm_kernel {
namespace w4a16_gemm_sm90_detail {

// The kernel compiles to an empty body below sm_90a, so other GPUs are refused, not run.
inline void require_sm90(int device) {
  int major = 0;
  int minor = 0;
  TVM_FFI_CHECK_CUDA_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  TVM_FFI_CHECK_CUDA_ERROR(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  TVM_FFI_CHECK(major == 9 && minor == 0, RuntimeError)
      << "w4a16_gemm_sm90: needs an SM 9.0 GPU (wgmma), got SM " << major << "." << minor;
}

template <typename T, int kTileM, bool kHasZero>
void launch_wgmma(const Params& p, dim3 grid, cudaStream_t stream, bool pdl, int device) {
  auto kernel = w4a16_gemm_sm90_kernel<T, kTileM, kHasZero>;
  constexpr int bytes = smem_bytes(kTileM);
  static bool granted[64] = {};
  // Checked with the shared-memory opt-in, once per device and instance, not at every launch.
  w4a16_gemv_detail::grant_shared_memory("w4a16_gemm_sm90", kernel, bytes, device, granted,
                                         [device] { require_sm90(device); });
  launch_kernel(kernel, grid, dim3(kThreads), bytes, stream, pdl, p);
}

}  // namespace w4a16_gemm_sm90_detail

// As w4a16_gemm (same arguments and layout) with row tiles of 64, 128 or 256; SM90 only.
template <typename T, bool kHasZero>
void w4a16_gemm_sm90(TensorView out, TensorView x, TensorView qweight, TensorView scales, Optional<TensorView> zeros,
                     Optional<TensorView> bias, TensorView partials, TensorView counters, int64_t group,
                     int64_t splits, int64_t tile_m, bool pdl) {
  using namespace w4a16_gemm_sm90_detail;
  static_assert(kTileN == w4a16_gemm_detail::kTileN && kTileK == w4a16_gemm_detail::kTileK,
                "make_params counts tiles of the mma.sync kernel's shape");
  TVM_FFI_CHECK(tile_m == 64 || tile_m == 128 || tile_m == 256, ValueError)
      << "w4a16_gemm_sm90: tile_m must be 64, 128 or 256";
  Params p;
  const int64_t slots = w4a16_gemm_detail::make_params<T, kHasZero>(
      "w4a16_gemm_sm90", p, out, x, qweight, scales, zeros, bias, partials, counters, group, splits, tile_m);
  const int device = x.device().device_id;
  tvm::ffi::CUDADeviceGuard guard(device);
  const cudaStream_t stream = current_stream(x);
  const dim3 grid(static_cast<unsigned>(slots), static_cast<unsigned>(splits));
  if (tile_m == 64) {
    launch_wgmma<T, 64, kHasZero>(p, grid, stream, pdl, device);
  } else if (tile_m == 128) {
    launch_wgmma<T, 128, kHasZero>(p, grid, stream, pdl, device);
  } else {
    launch_wgmma<T, 256, kHasZero>(p, grid, stream, pdl, device);
  }
}

}  // namespace mllm_kernel
