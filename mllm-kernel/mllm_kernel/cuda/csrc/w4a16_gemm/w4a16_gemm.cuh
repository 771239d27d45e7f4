// w4a16_gemm's host side: argument checks, the split's bounds and the launch. The kernel and the
// layout it reads are described in w4a16_gemm_kernel.cuh.
#pragma once

#include "w4a16_gemm/w4a16_gemm_kernel.cuh"
#include "w4a16_gemv/w4a16_gemv.cuh"  // the shared host-side checks

namespace mllm_kernel {
namespace w4a16_gemm_detail {

// The checks and launch parameters both GEMM kernels share (tiles of kTileN = 128 columns and 64
// k; `op` names the caller in errors). Returns the grid's slot count (row tiles x column tiles).
template <typename T, bool kHasZero>
int64_t make_params(const char* op, Params& p, TensorView out, TensorView x, TensorView qweight, TensorView scales,
                    Optional<TensorView> zeros, Optional<TensorView> bias, TensorView partials, TensorView counters,
                    int64_t group, int64_t splits, int64_t tile_m) {
  using w4a16_gemv_detail::aligned;
  using w4a16_gemv_detail::check_matrix;
  using w4a16_gemv_detail::check_weights;
  using w4a16_gemv_detail::dtype_code;
  using w4a16_gemv_detail::has_dtype;
  constexpr uint8_t code = dtype_code<T>();
  TVM_FFI_CHECK(has_dtype(x, code, 16) && x.ndim() == 2, TypeError) << op << ": x must be [M, K] of the kernel dtype";
  const int64_t m = x.size(0);
  const int64_t k = x.size(1);
  TVM_FFI_CHECK(m >= 1 && m < (int64_t{1} << 31), ValueError) << op << ": x must have at least one row";
  TVM_FFI_CHECK(k > 0 && k % kTileK == 0, ValueError) << op << ": K must be a positive multiple of " << kTileK;
  TVM_FFI_CHECK(x.stride(1) == 1 && x.stride(0) % 8 == 0 && aligned(x, 16), ValueError)
      << op << ": x needs dense rows, a row stride of a multiple of 8 elements and 16-byte alignment";
  TVM_FFI_CHECK(qweight.ndim() == 2, ValueError) << op << ": qweight must be [K/8, N]";
  const int64_t n = qweight.size(1);
  TVM_FFI_CHECK(n > 0 && n % 4 == 0, ValueError) << op << ": N must be a positive multiple of 4";
  check_weights<kHasZero>(op, code, qweight, scales, zeros, bias, k, n, group);
  check_matrix(op, out, "out", m, n, code, 16, 4);
  const int64_t k_tiles = k / kTileK;
  TVM_FFI_CHECK(splits >= 1 && splits <= 65535 && k_tiles % splits == 0, ValueError)
      << op << ": splits must divide K / " << kTileK << " = " << k_tiles;
  const int64_t row_tiles = ceil_div(m, tile_m);
  const int64_t col_tiles = ceil_div(n, kTileN);
  const int64_t slots = row_tiles * col_tiles;
  TVM_FFI_CHECK(slots < (int64_t{1} << 31), ValueError) << op << ": too many tiles";
  if (splits > 1) {
    TVM_FFI_CHECK(has_dtype(partials, kDLFloat, 32) && partials.IsContiguous() && has_dtype(counters, kDLInt, 32) &&
                      counters.IsContiguous(), TypeError)
        << op << ": the workspace must be contiguous float32 partials and int32 counters";
    TVM_FFI_CHECK(slots <= counters.numel() && slots * splits * tile_m * kTileN <= partials.numel(), ValueError)
        << op << ": the workspace is too small for " << splits << " splits of " << slots << " tiles";
  }

  int group_shift = 31;
  if (group != k) {
    group_shift = 0;
    while ((int64_t{1} << group_shift) < group) ++group_shift;
  }
  p = Params{};
  w4a16_gemv_detail::set_operands<kHasZero>(p, out, x, qweight, scales, zeros, bias, partials, counters);
  p.x_stride = x.stride(0);
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.row_tiles = static_cast<int>(row_tiles);
  p.k_chunk = static_cast<int>(k / splits);
  p.splits = static_cast<int>(splits);
  p.group_shift = group_shift;
  return slots;
}

template <typename T, int kGroups, bool kHasZero>
void launch(const Params& p, dim3 grid, cudaStream_t stream, bool pdl, int device) {
  auto kernel = w4a16_gemm_kernel<T, kGroups, kHasZero>;
  constexpr int bytes = smem_bytes(8 * kGroups);
  static bool granted[64] = {};
  w4a16_gemv_detail::grant_shared_memory("w4a16_gemm", kernel, bytes, device, granted);
  launch_kernel(kernel, grid, dim3(kThreads), bytes, stream, pdl, p);
}

}  // namespace w4a16_gemm_detail

// out [M, N] = x [M, K] @ dequant(qweight, scales, zeros) (+ bias). tile_m (16, 32 or 64) is the
// block's row tile; splits the number of K chunks (each a multiple of 64 k); partials (float32)
// and counters (int32, zero between launches) the split-K workspace; pdl launches the kernel as a
// programmatic dependent (SM90+). N must be a multiple of 4, K of 64.
template <typename T, bool kHasZero>
void w4a16_gemm(TensorView out, TensorView x, TensorView qweight, TensorView scales, Optional<TensorView> zeros,
                Optional<TensorView> bias, TensorView partials, TensorView counters, int64_t group, int64_t splits,
                int64_t tile_m, bool pdl) {
  using namespace w4a16_gemm_detail;
  TVM_FFI_CHECK(tile_m == 16 || tile_m == 32 || tile_m == 64, ValueError) << "w4a16_gemm: tile_m must be 16, 32 or 64";
  Params p;
  const int64_t slots = make_params<T, kHasZero>("w4a16_gemm", p, out, x, qweight, scales, zeros, bias, partials,
                                                 counters, group, splits, tile_m);
  const int device = x.device().device_id;
  tvm::ffi::CUDADeviceGuard guard(device);
  const cudaStream_t stream = current_stream(x);
  const dim3 grid(static_cast<unsigned>(slots), static_cast<unsigned>(splits));
  if (tile_m == 16) {
    launch<T, 2, kHasZero>(p, grid, stream, pdl, device);
  } else if (tile_m == 32) {
    launch<T, 4, kHasZero>(p, grid, stream, pdl, device);
  } else {
    launch<T, 8, kHasZero>(p, grid, stream, pdl, device);
  }
}

}  // namespace mllm_kernel
