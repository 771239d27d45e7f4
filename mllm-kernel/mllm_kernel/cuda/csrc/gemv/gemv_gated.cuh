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
// the two GEMVs sum in the same order; the k loop, the tilings and PDL are gemv.cuh's.
#pragma once

#include "gemv_prologue.cuh"

namespace mllm_kernel {
namespace gemv_detail {

// R weight rows per warp: R / 2 gate rows [j0, j0 + R / 2) and the up rows N + j0 ... .
template <typename F, typename T, int M, int R, bool kSplitK>
__global__ void __launch_bounds__(kThreads) gemv_gated_silu_kernel(Problem p, typename F::Extra extra) {
  using W = Walk<F, R, kSplitK, kWarpsPerBlock>;
  constexpr int kPairs = R / 2;
  static_assert(R % 2 == 0, "a warp takes whole gate/up pairs");
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x / 32;
  const int64_t j0 = W::row0(warp) / 2;  // the warp's first output
  const bool active = j0 < p.n;           // false for whole blocks only under split-K
  const char* wrow[R];
#pragma unroll
  for (int r = 0; r < kPairs; ++r) {
    const int64_t j = min(j0 + r, p.n - 1);  // outputs past N re-read the last pair, dropped below
    wrow[r] = p.w + j * p.k * F::kWBytes;
    wrow[kPairs + r] = p.w + (p.n + j) * p.k * F::kWBytes;
  }
  uint4 wv[W::kUnroll][R];
  const int64_t k0 = W::k_first(lane, warp);
  const bool preloaded = active && W::preload(wv, wrow, k0, p.k);
  pdl_wait();
  if (!active) return;

  typename F::Acc acc[M][R];
  W::zero(acc);
  W::template accumulate<M>(p.x, p.x_stride, 0, wrow, k0, p.k, preloaded, wv, acc);
  if (!W::template reduce<M>(acc, lane, warp)) return;
  const T* bias = reinterpret_cast<const T*>(p.bias);
  T* y = reinterpret_cast<T*>(p.y);
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < kPairs; ++r) {
      const int64_t j = j0 + r;
      if (j >= p.n) continue;
      float g = F::finish(acc[m][r], m, j, extra);
      float u = F::finish(acc[m][kPairs + r], m, p.n + j, extra);
      if (bias != nullptr) {
        g = __fadd_rn(g, static_cast<float>(bias[j]));
        u = __fadd_rn(u, static_cast<float>(bias[p.n + j]));
      }
      y[m * p.y_stride + j] = from_float<T>(silu_mul_rounded<T>(round_to<T>(g), round_to<T>(u)));
    }
}

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

template <typename F, typename T, int M, int R, bool kSplitK>
void launch_gated(const Problem& p, const typename F::Extra& extra, cudaStream_t stream, bool pdl) {
  const int64_t groups = ceil_div(p.n, static_cast<int64_t>(R / 2));  // warps (split-K: blocks)
  const int64_t blocks = kSplitK ? groups : ceil_div(groups, kWarpsPerBlock);
  launch_kernel(gemv_gated_silu_kernel<F, T, M, R, kSplitK>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0,
                stream, pdl, p, extra);
}

template <typename F, typename T>
void dispatch_gated(const Problem& p, int64_t m, const Tiling& t, const typename F::Extra& extra, cudaStream_t stream,
                    bool pdl) {
  with_rows(m, [&](auto mc) {
    constexpr int M = decltype(mc)::value;
    if (t.split_k) {
      if (t.rows == 4) return launch_gated<F, T, M, 4, true>(p, extra, stream, pdl);
      return launch_gated<F, T, M, 2, true>(p, extra, stream, pdl);
    }
    if (t.rows == 4) return launch_gated<F, T, M, 4, false>(p, extra, stream, pdl);
    return launch_gated<F, T, M, 2, false>(p, extra, stream, pdl);
  });
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
  dispatch_gated<DenseFormat<T>, T>(p, x.size(0), t, {}, stream, pdl);
}

}  // namespace mllm_kernel
