// Decode GEMV of a stacked gate/up projection with the SiLU-and-mul as its epilogue:
//
//   y[m, j] = T(T(silu(g)) * u),  g = T(x[m] . W[j] (+ bias[j])),  u = T(x[m] . W[N + j] (+ bias[N + j]))
//
// for W = [gate; up] with 2N rows, as the model stacks gate_up_proj (no relayout). Every warp
// streams the gate rows and the matching up rows of its outputs, so the warp that finishes a
// pair holds both dot products and writes the activation the down projection reads: the
// gate/up output never goes to memory and the SiLU-and-mul launch between the two GEMVs is gone.
// Unlike the SiLU-and-mul prologue (gemv_prologue.cuh), which recomputes the activation in every
// block of the down projection, this costs nothing beyond the two products, so it pays for long
// rows too (Qwen3-8B's 2 x 12288 x 4096 gate_up).
//
// g and u are rounded to T and then combined exactly as _silu_and_mul_kernel combines the
// stored gate_up output (silu_mul_rounded), so y equals gemv followed by silu_and_mul whenever
// the two GEMVs sum in the same order. The kernel, its k loop and launch are gemv.cuh's, with
// the output policy below.
#pragma once

#include "gemv_prologue.cuh"

namespace mllm_kernel {
namespace gemv_detail {

// gemv_kernel's output policy for W = [gate; up]: a warp's R weight rows are the gate rows of its
// R / 2 outputs [out0, out0 + R / 2), then their up rows N + out0, ...
struct GatedSiluOutput {
  static constexpr int kWeightRows = 2;

  // Outputs past N (only in the last warp) re-read the last pair and are dropped.
  template <typename F, int R>
  static __device__ __forceinline__ void rows(const Problem& p, int64_t out0, const char* (&wrow)[R]) {
    constexpr int kPairs = R / 2;
#pragma unroll
    for (int r = 0; r < kPairs; ++r) {
      const int64_t j = min(out0 + r, p.n - 1);
      wrow[r] = p.w + j * p.k * F::kWBytes;
      wrow[kPairs + r] = p.w + (p.n + j) * p.k * F::kWBytes;
    }
  }

  template <typename F, typename T, int M, int R>
  static __device__ __forceinline__ void write(const Problem& p, const typename F::Extra& extra,
                                               const typename F::Acc (&acc)[M][R], int64_t out0) {
    constexpr int kPairs = R / 2;
    const T* bias = reinterpret_cast<const T*>(p.bias);
    T* y = reinterpret_cast<T*>(p.y);
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < kPairs; ++r) {
        const int64_t j = out0 + r;
        if (j >= p.n) continue;
        float g = F::finish(acc[m][r], m, j, extra);
        float u = F::finish(acc[m][kPairs + r], m, p.n + j, extra);
        if (bias != nullptr) {
          g = __fadd_rn(g, static_cast<float>(bias[j]));
          u = __fadd_rn(u, static_cast<float>(bias[p.n + j]));
        }
        y[m * p.y_stride + j] =
            from_float<T>(silu_mul_rounded<T>(round_to_dtype<T>(g), round_to_dtype<T>(u)));
      }
  }
};

// The plain GEMV's occupancy rule on the 2N weight rows, with at least one pair per warp.
inline Tiling choose_gated_tiling(int64_t n, int64_t m, int sms) {
  const Tiling t = choose_tiling(2 * n, m, sms);
  if (t.rows == 1) return {2, n < 16LL * sms};
  return t;
}

// `forced` 0 picks with choose_gated_tiling; else weight rows per warp + 10 * split-K: 2, 4, 12
// or 14 (pymllm measures them and keeps the fastest).
inline Tiling gated_tiling(int64_t n, int64_t m, int device, int64_t forced) {
  if (forced == 0) return choose_gated_tiling(n, m, sm_count(device));
  TVM_FFI_CHECK(forced == 2 || forced == 4 || forced == 12 || forced == 14, ValueError)
      << "no compiled gated GEMV tiling " << forced << " (weight rows per warp + 10 * split-K: 2, 4, 12 or 14)";
  return {static_cast<int>(forced % 10), forced >= 10};
}

}  // namespace gemv_detail

// y [M, N] = silu(x @ w[:N]^T (+ bias[:N])) * (x @ w[N:]^T (+ bias[N:])) for x [M, K] (M <= 8),
// w [2N, K], bias [2N], each product rounded to T first; T in {__half, __nv_bfloat16}. tiling: 0
// or a forced tiling (gated_tiling); pdl as in gemv.
template <typename T>
void gemv_gated_silu(TensorView x, TensorView w, Optional<TensorView> bias, TensorView y, int64_t tiling, bool pdl) {
  using namespace gemv_detail;
  const Problem p = make_problem(x, w, bias, y, sizeof(T), sizeof(T), 8, 1, 2);
  if (p.n == 0) return;
  tvm::ffi::CUDADeviceGuard guard(x.device().device_id);
  const cudaStream_t stream = current_stream(x);
  const Tiling t = gated_tiling(p.n, x.size(0), x.device().device_id, tiling);
  dispatch<DenseFormat<T>, T, GatedSiluOutput>(p, x.size(0), t, {}, stream, pdl);
}

}  // namespace mllm_kernel
