// w4a16_gemv's host side: argument checks, the split plan's bounds and the launch. The kernel and
// the layout it reads are described in w4a16_gemv_kernel.cuh.
#pragma once

#include <algorithm>
#include <type_traits>
#include <utility>

#include "w4a16_gemv_one_row.cuh"
#include "w4a16_gemv_kernel.cuh"

namespace mllm_kernel {
namespace w4a16_gemv_detail {

// One kernel per M = 1..8 (the epilogue and the activation row clamp are specialised), and one
// wide kernel for 9..64 rows (two MMA row groups, the row count read at run time, chunks of 16
// rows in neighbouring blocks).
template <typename T, bool kHasZero, bool kGated, int... Ms>
void launch_rows(int m, const Params& p, int n_tiles, cudaStream_t stream, bool pdl,
                 std::integer_sequence<int, Ms...>) {
  const dim3 grid(static_cast<unsigned>(n_tiles * p.chunks), static_cast<unsigned>(p.splits));
  if (m > kNarrowMaxM) {
    launch_kernel(w4a16_gemv_kernel<T, kWideRows, kHasZero, kGated>, grid, dim3(kThreads), 0, stream, pdl, p);
    return;
  }
  ((m == Ms + 1 ? launch_kernel(w4a16_gemv_kernel<T, Ms + 1, kHasZero, kGated>, grid, dim3(kThreads), 0, stream,
                                pdl, p)
                : void()),
   ...);
}

// Opts a kernel into `bytes` of dynamic shared memory (past 48 KiB of static + dynamic shared
// memory a kernel must), once per device (`granted`: the kernel's own flags); `first_use()` runs
// before that, once per device too (a check that the device can run the kernel at all).
template <typename Kernel, typename FirstUse>
void grant_shared_memory(const char* op, Kernel kernel, int bytes, int device, bool (&granted)[64],
                         FirstUse&& first_use) {
  TVM_FFI_CHECK(device >= 0 && device < 64, ValueError) << op << ": device index " << device << " out of range";
  if (!granted[device]) {
    first_use();
    TVM_FFI_CHECK_CUDA_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    granted[device] = true;
  }
}
template <typename Kernel>
void grant_shared_memory(const char* op, Kernel kernel, int bytes, int device, bool (&granted)[64]) {
  grant_shared_memory(op, kernel, bytes, device, granted, [] {});
}

// The one-row kernel in blocks of kBlockWarps warps on tiles of kSub 32-column subtiles.
template <typename T, bool kHasZero, bool kGated, int kBlockWarps, int kNorm, int kSub>
void launch_one_row_instance(const Params& p, int n_tiles, cudaStream_t stream, bool pdl, int device) {
  auto kernel = w4a16_gemv_one_row_kernel<T, kHasZero, kGated, kBlockWarps, kNorm, kSub>;
  constexpr int bytes = one_row_ring_bytes<kSub>(kBlockWarps);
  static bool granted[64] = {};
  grant_shared_memory("w4a16_gemv", kernel, bytes, device, granted);
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(p.splits));
  launch_kernel(kernel, grid, dim3(32 * kBlockWarps), bytes, stream, pdl, p);
}

// The instance of a deferred-RMSNorm side (norm: 0 none, 1 producer, 2 consumer; no gated producer).
template <typename T, bool kHasZero, bool kGated, int kBlockWarps, int kSub>
void launch_one_row(const Params& p, int n_tiles, cudaStream_t stream, bool pdl, int device, int norm) {
  if (norm == kNormConsume) {
    launch_one_row_instance<T, kHasZero, kGated, kBlockWarps, kNormConsume, kSub>(p, n_tiles, stream, pdl, device);
  } else if (norm == kNormProduce) {
    if constexpr (!kGated) {
      launch_one_row_instance<T, kHasZero, kGated, kBlockWarps, kNormProduce, kSub>(p, n_tiles, stream, pdl, device);
    }
  } else {
    launch_one_row_instance<T, kHasZero, kGated, kBlockWarps, kNormNone, kSub>(p, n_tiles, stream, pdl, device);
  }
}

// Rows of partials a launch of m rows reserves per (tile, chunk, split): the wide kernel's stride is kWideRows.
inline int64_t partial_rows(int64_t m) { return m > kNarrowMaxM ? kWideRows : m; }
// Row chunks (blocks per column tile and split) of a launch of m rows.
inline int64_t row_chunks(int64_t m) { return m > kNarrowMaxM ? ceil_div(m, kWideRows) : 1; }

template <typename T>
constexpr uint8_t dtype_code() {
  return std::is_same_v<T, __half> ? kDLFloat : kDLBfloat;
}

inline bool has_dtype(const TensorView& t, uint8_t code, int bits) {
  return t.dtype().code == code && t.dtype().bits == bits && t.dtype().lanes == 1;
}

inline bool aligned(const TensorView& t, uint64_t bytes) {
  return reinterpret_cast<uint64_t>(byte_ptr(t)) % bytes == 0;
}

// A [rows, cols] tensor of `code`/`bits`, contiguous and `align`-byte aligned; errors name `op`.
inline void check_matrix(const char* op, const TensorView& t, const char* name, int64_t rows, int64_t cols,
                         uint8_t code, int bits, uint64_t align) {
  TVM_FFI_CHECK(has_dtype(t, code, bits), TypeError) << op << ": " << name << " has the wrong dtype";
  TVM_FFI_CHECK(t.ndim() == 2 && t.size(0) == rows && t.size(1) == cols, ValueError)
      << op << ": " << name << " must be [" << rows << ", " << cols << "]";
  TVM_FFI_CHECK(t.IsContiguous(), ValueError) << op << ": " << name << " must be contiguous";
  TVM_FFI_CHECK(aligned(t, align), ValueError) << op << ": " << name << " must be " << align << "-byte aligned";
}

// The quantized weight of an [.., K] x [K, N] product in the runtime layout, as w4a16_gemv and
// w4a16_gemm read it: qweight [K/8, N] int32 (fewer than 2^31 words: 32-bit offsets), group K or a
// power of two >= 32 dividing K, scales (and zeros, exactly when the instance has them) [K/G, N]
// of the activation dtype `code`, bias [N].
template <bool kHasZero>
inline void check_weights(const char* op, uint8_t code, const TensorView& qweight, const TensorView& scales,
                          const Optional<TensorView>& zeros, const Optional<TensorView>& bias, int64_t k, int64_t n,
                          int64_t group) {
  TVM_FFI_CHECK((k / 8) * n < (int64_t{1} << 31), ValueError)
      << op << ": qweight must have fewer than 2^31 words (32-bit offsets)";
  check_matrix(op, qweight, "qweight", k / 8, n, kDLInt, 32, 16);
  const bool group_ok = group == k || (group >= 32 && (group & (group - 1)) == 0 && k % group == 0);
  TVM_FFI_CHECK(group_ok, ValueError) << op << ": group must be K or a power of two >= 32 dividing K";
  check_matrix(op, scales, "scales", k / group, n, code, 16, 8);
  TVM_FFI_CHECK(zeros.has_value() == kHasZero, ValueError) << op << ": zeros given to the wrong instance";
  if (kHasZero) check_matrix(op, zeros.value(), "zeros", k / group, n, code, 16, 8);
  if (bias.has_value()) {
    const TensorView& b = bias.value();
    TVM_FFI_CHECK(has_dtype(b, code, 16) && b.ndim() == 1 && b.size(0) == n && b.IsContiguous(), ValueError)
        << op << ": bias must be a contiguous [N] tensor of x's dtype";
  }
}

// The operand pointers the Params of w4a16_gemv and of both w4a16_gemm kernels hold (checked
// before: zeros exactly when kHasZero).
template <bool kHasZero, typename P>
inline void set_operands(P& p, const TensorView& out, const TensorView& x, const TensorView& qweight,
                         const TensorView& scales, const Optional<TensorView>& zeros, const Optional<TensorView>& bias,
                         const TensorView& partials, const TensorView& counters) {
  p.qweight = reinterpret_cast<const uint32_t*>(byte_ptr(qweight));
  p.x = reinterpret_cast<const uint16_t*>(byte_ptr(x));
  p.scales = reinterpret_cast<const uint16_t*>(byte_ptr(scales));
  p.zeros = kHasZero ? reinterpret_cast<const uint16_t*>(byte_ptr(zeros.value())) : nullptr;
  p.bias = bias.has_value() ? reinterpret_cast<const uint16_t*>(byte_ptr(bias.value())) : nullptr;
  p.out = reinterpret_cast<uint16_t*>(byte_ptr(out));
  p.partials = reinterpret_cast<float*>(byte_ptr(partials));
  p.counters = reinterpret_cast<unsigned*>(byte_ptr(counters));
}

}  // namespace w4a16_gemv_detail

// out [M, N] = x [M, K] @ dequant(qweight, scales, zeros) (+ bias); M in 1..64. partials (float32)
// and counters (int32, all zero between launches) are the split-K workspace; `splits` is the
// requested number of K chunks (the wrapper's plan), shrunk here so no chunk is empty;
// `prefetch` how many batches ahead each warp of the register kernel prefetches its weights into
// L2 (0 disables); `one_row_warps` (8 or 16; M = 1 only) runs the one-row kernel of
// w4a16_gemv_one_row.cuh in blocks of that many warps instead (0: the register kernel), and
// `early_weights` lets it copy its first weights before the PDL wait, `one_row_tile_n` (64, or 32:
// narrow tiles, 16-warp blocks only) sets its columns per block; `early_dependents` lets the
// next kernel launch at the start of either kernel instead of after its k loop, where the grid fits
// in one wave; `pdl`
// launches it as a programmatic dependent of the kernel before it (SM90+; mllm_kernel.pdl).
// kGated: the weight stacks gate and up projections ([K/8, 2H], bias [2H]) and out [M, H] is
// silu(gate) * up, the SiLU-and-mul as the epilogue (see write_outputs); N must then be a multiple of 8.
// Deferred RMSNorm (one-row kernel only, see Params): `norm_residual`, `norm_weight` and
// `norm_residual_out` ([N] of x's dtype) with `norm_sumsq_out` (float32, one per column tile)
// make a plain launch the norm's producer; `norm_sumsq` (a producer's float32 sums, at most 128)
// with `norm_eps` makes a launch its consumer.
template <typename T, bool kHasZero, bool kGated>
void w4a16_gemv(TensorView out, TensorView x, TensorView qweight, TensorView scales, Optional<TensorView> zeros,
                Optional<TensorView> bias, TensorView partials, TensorView counters, int64_t group, int64_t splits,
                int64_t prefetch, int64_t one_row_warps, int64_t one_row_tile_n, bool early_weights,
                bool early_dependents, bool pdl,
                Optional<TensorView> norm_residual, Optional<TensorView> norm_weight,
                Optional<TensorView> norm_residual_out, Optional<TensorView> norm_sumsq_out,
                Optional<TensorView> norm_sumsq, double norm_eps) {
  using namespace w4a16_gemv_detail;
  constexpr uint8_t code = dtype_code<T>();
  // The Python wrapper reports user-facing errors; these checks guard the address arithmetic.
  TVM_FFI_CHECK(has_dtype(x, code, 16) && x.ndim() == 2, TypeError)
      << "w4a16_gemv: x must be [M, K] of the kernel dtype";
  const int64_t m = x.size(0);
  const int64_t k = x.size(1);
  TVM_FFI_CHECK(m >= 1 && m <= kMaxRows, ValueError) << "w4a16_gemv: x must have 1.." << kMaxRows << " rows";
  TVM_FFI_CHECK(k > 0 && k % 8 == 0, ValueError) << "w4a16_gemv: K must be a positive multiple of 8";
  TVM_FFI_CHECK(x.stride(1) == 1 && (m == 1 || x.stride(0) % 8 == 0) && aligned(x, 16), ValueError)
      << "w4a16_gemv: x needs dense rows, a row stride of a multiple of 8 elements and 16-byte alignment";
  TVM_FFI_CHECK(qweight.ndim() == 2, ValueError) << "w4a16_gemv: qweight must be [K/8, N]";
  const int64_t n = qweight.size(1);
  TVM_FFI_CHECK(n % (kGated ? 8 : 4) == 0, ValueError)
      << "w4a16_gemv: N must be a multiple of " << (kGated ? "8 (gated: two halves of multiples of 4)" : "4");
  check_weights<kHasZero>("w4a16_gemv", code, qweight, scales, zeros, bias, k, n, group);
  check_matrix("w4a16_gemv", out, "out", m, kGated ? n / 2 : n, code, 16, 2);
  TVM_FFI_CHECK(has_dtype(partials, kDLFloat, 32) && partials.IsContiguous(), TypeError)
      << "w4a16_gemv: partials must be a contiguous float32 tensor";
  TVM_FFI_CHECK(has_dtype(counters, kDLInt, 32) && counters.IsContiguous(), TypeError)
      << "w4a16_gemv: counters must be a contiguous int32 tensor";
  TVM_FFI_CHECK(splits >= 1, ValueError) << "w4a16_gemv: splits must be >= 1";
  TVM_FFI_CHECK(prefetch >= 0 && prefetch <= 8, ValueError) << "w4a16_gemv: prefetch must be in 0..8";
  TVM_FFI_CHECK(one_row_warps == 0 || ((one_row_warps == 8 || one_row_warps == 16) && m == 1), ValueError)
      << "w4a16_gemv: one_row_warps must be 0, or 8 or 16 for one activation row";
  const bool narrow = one_row_tile_n == 32;
  TVM_FFI_CHECK(one_row_tile_n == kTileN || (narrow && one_row_warps == 16), ValueError)
      << "w4a16_gemv: one_row_tile_n must be " << kTileN << ", or 32 for 16-warp one-row blocks";
  const int tile_n = narrow ? 32 : kTileN;
  const int n_tiles = static_cast<int>(kGated ? ceil_div(n / 2, tile_n / 2) : ceil_div(n, tile_n));
  const bool norm_out = norm_weight.has_value();
  TVM_FFI_CHECK(norm_out == norm_residual.has_value() && norm_out == norm_residual_out.has_value() &&
                    norm_out == norm_sumsq_out.has_value(), ValueError)
      << "w4a16_gemv: norm_residual, norm_weight, norm_residual_out and norm_sumsq_out go together";
  const bool norm_in = norm_sumsq.has_value();
  if (norm_out || norm_in) {
    TVM_FFI_CHECK(one_row_warps != 0, ValueError) << "w4a16_gemv: a deferred RMSNorm needs the one-row kernel";
    TVM_FFI_CHECK(!(norm_out && norm_in), ValueError)
        << "w4a16_gemv: a launch is a deferred RMSNorm's producer or its consumer, not both";
  }
  if (norm_out) {
    TVM_FFI_CHECK(!kGated, ValueError) << "w4a16_gemv: a gated launch cannot produce a deferred RMSNorm";
    for (const TensorView* t : {&norm_residual.value(), &norm_weight.value(), &norm_residual_out.value()}) {
      TVM_FFI_CHECK(has_dtype(*t, code, 16) && t->numel() == n && t->IsContiguous(), ValueError)
          << "w4a16_gemv: the deferred norm's residual, weight and residual_out must be contiguous [N] of x's dtype";
    }
    const TensorView& sums = norm_sumsq_out.value();
    TVM_FFI_CHECK(has_dtype(sums, kDLFloat, 32) && sums.IsContiguous() && sums.numel() == n_tiles, ValueError)
        << "w4a16_gemv: norm_sumsq_out must be a contiguous float32 tensor of " << n_tiles << " tile sums";
  }
  if (norm_in) {
    const TensorView& sums = norm_sumsq.value();
    TVM_FFI_CHECK(has_dtype(sums, kDLFloat, 32) && sums.IsContiguous() && sums.numel() >= 1 &&
                      sums.numel() <= 32 * kNormLoadsPerLane, ValueError)
        << "w4a16_gemv: norm_sumsq must be a contiguous float32 tensor of 1.." << 32 * kNormLoadsPerLane
        << " tile sums";
  }
  if (n == 0) return;

  const int rows = static_cast<int>(k / 8);
  // Rows per batch (and steps per fold window at most): the one-row kernel's stage, or the
  // register kernel's batch.
  const int batch_rows = one_row_warps == 0 ? kBatchRows : narrow ? OneRowStage<1>::kRows : OneRowStage<2>::kRows;
  const int batch_steps = batch_rows / 4;
  const int total_batches = static_cast<int>(ceil_div(rows, batch_rows));
  // At most one split per batch, and gridDim.y <= 65535.
  const int chunk = static_cast<int>(ceil_div(total_batches, std::min<int64_t>({splits, total_batches, 65535})));
  const int used_splits = static_cast<int>(ceil_div(total_batches, chunk));
  const int64_t slots = n_tiles * row_chunks(m);  // (tile, row chunk) pairs
  if (used_splits > 1) {
    TVM_FFI_CHECK(slots <= counters.numel() && slots * used_splits * partial_rows(m) * tile_n <= partials.numel(),
                  ValueError)
        << "w4a16_gemv: the workspace is too small for " << used_splits << " splits of " << slots
        << " tiles x row chunks";
  }

  // Packed row -> group is a shift: groups are powers of two, and one group for all of K
  // (channel-wise, any K) takes shift 31, mapping every row (< 2^30) to group 0.
  const int group_rows = static_cast<int>(group / 8);
  int group_shift = 31;
  if (group != k) {
    group_shift = 0;
    while ((1 << group_shift) < group_rows) ++group_shift;
  }
  // A fold window is as many steps as fit in one group (a group holds group_rows / 4 steps).
  const int window = group == k ? batch_steps : std::min(batch_steps, group_rows / 4);

  Params p{};
  set_operands<kHasZero>(p, out, x, qweight, scales, zeros, bias, partials, counters);
  p.x_stride = m == 1 ? k : x.stride(0);
  p.n = static_cast<int>(n);
  p.m = static_cast<int>(m);
  p.chunks = static_cast<int>(row_chunks(m));
  p.rows = rows;
  p.group_shift = group_shift;
  p.fold_mask = window - 1;
  p.chunk_batches = chunk;
  p.prefetch = static_cast<int>(prefetch);
  p.early_weights = early_weights ? 1 : 0;
  p.uniform = one_row_warps != 0 && rows % batch_rows == 0 &&
                      (group == k || (group_rows >= batch_rows && group_rows <= one_row_warps * batch_rows))
                  ? 1
                  : 0;
  p.splits = used_splits;
  if (norm_out) {
    p.norm_residual = reinterpret_cast<const uint16_t*>(byte_ptr(norm_residual.value()));
    p.norm_weight = reinterpret_cast<const uint16_t*>(byte_ptr(norm_weight.value()));
    p.norm_residual_out = reinterpret_cast<uint16_t*>(byte_ptr(norm_residual_out.value()));
    p.norm_sumsq_out = reinterpret_cast<float*>(byte_ptr(norm_sumsq_out.value()));
  }
  if (norm_in) {
    p.norm_sumsq = reinterpret_cast<const float*>(byte_ptr(norm_sumsq.value()));
    p.norm_tiles = static_cast<int>(norm_sumsq.value().numel());
    p.norm_inv_k = 1.f / static_cast<float>(k);
    p.norm_eps = static_cast<float>(norm_eps);
  }

  tvm::ffi::CUDADeviceGuard guard(x.device().device_id);
  const cudaStream_t stream = current_stream(x);
  // Early dependents only where every block of the grid is resident at once (the launch bounds'
  // blocks per SM are a lower bound on what the registers allow).
  const int sms = sm_count(x.device().device_id);
  const int64_t blocks = static_cast<int64_t>(n_tiles) * p.chunks * used_splits;
  const int per_sm = one_row_warps != 0 ? one_row_blocks_per_sm(static_cast<int>(one_row_warps))
                                        : register_blocks_per_sm(static_cast<int>(m), kGated);
  p.early_dependents = early_dependents && blocks <= static_cast<int64_t>(sms) * per_sm ? 1 : 0;
  const int norm = norm_out ? kNormProduce : norm_in ? kNormConsume : kNormNone;
  if (one_row_warps == 8) {
    launch_one_row<T, kHasZero, kGated, 8, 2>(p, n_tiles, stream, pdl, x.device().device_id, norm);
  } else if (one_row_warps == 16 && narrow) {
    launch_one_row<T, kHasZero, kGated, 16, 1>(p, n_tiles, stream, pdl, x.device().device_id, norm);
  } else if (one_row_warps == 16) {
    launch_one_row<T, kHasZero, kGated, 16, 2>(p, n_tiles, stream, pdl, x.device().device_id, norm);
  } else {
    launch_rows<T, kHasZero, kGated>(static_cast<int>(m), p, n_tiles, stream, pdl,
                                     std::make_integer_sequence<int, kNarrowMaxM>{});
  }
}

}  // namespace mllm_kernel
