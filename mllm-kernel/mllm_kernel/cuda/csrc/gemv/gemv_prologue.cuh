// Decode GEMV with a fused input transform ("prologue"): the activation the GEMV multiplies is
// computed inside the kernel from the layer's input, so a decode step launches one kernel where
// it launched two or three (norm / activation, quantization, GEMV).
//
//  * RmsNorm:  a = RMSNorm(x [+ residual]) * norm_weight; with a residual, residual_out = x + residual.
//  * SiluMul:  x = [gate | up] of width 2K, a = silu(gate) * up.
//  * None:     a = x (for the int8 entry, which then only quantizes).
// Then y = a @ W^T (+ bias) with dense fp16/bf16 weights, or, for int8 weights (W8A8), a is
// quantized per token in the kernel and meets W on dp4a, exactly as gemv_w8a8 on the output of
// per_token_quant_int8_reference: scale = max(max|a|, 1e-10) / 127.5 and
// q = clamp(round_half_even(a / scale), -128, 127), both divisions correctly rounded.
//
// The activation is rounded as pymllm's Triton kernels (norm_act_triton.py) round it, with the
// approximate instructions Triton emits (ex2.approx for exp, div.full for float32 division,
// rsqrt.approx): rmsnorm rounds x + residual, the normalised value and the weighted value to the
// activation dtype; silu(gate) is rounded before the multiply. The SiLU-and-mul activation is
// therefore the Triton kernel's bit for bit; the RMSNorm one differs only through the order of
// the float32 sum of squares, which can move an element by one unit in the last place.
//
// Every block needs the whole activation (each block's rows span all of K), so each block
// computes it: first the per-row statistics over all of K (1 / rms; for int8 the absolute maximum,
// hence the scale), then the activation itself, once per block, into shared memory in the form
// the weights meet (fp16/bf16, or int8); the k loop of gemv.cuh then reads it from there. Rows
// longer than the staging buffer go in chunks of K. The first weight loads are issued before all
// of that, so that their DRAM latency overlaps the block's prologue. The prologue's cost grows
// with M * K and is paid once per block, so the blocks are large (choose_prologue_tiling), and
// the fusion pays off for short rows and one or two activation rows; measure before dispatching
// (bench_gemv.py --fused).
//
// The sum of squares runs in one fixed order in every instantiation (the block's first 4 warps,
// thread t taking the 8-element vectors t, t + 128, ...; then lanes, then warps), so all kernels
// of a prologue compute bit-identical activations for the same inputs, whatever the format,
// tiling or M.
#pragma once

#include <algorithm>

#include "gemv.cuh"
#include "triton_math.cuh"

namespace mllm_kernel {
namespace gemv_detail {

// The template argument that names the prologue (also the Python side's numbering).
enum PrologueKind : int { kNoPrologue = 0, kRmsNormPrologue = 1, kSiluMulPrologue = 2 };

// Inputs of the prologues beyond x (unused ones null / zero).
struct PrologueArgs {
  const char* residual;      // RmsNorm: [M, K] added to x first, or nullptr
  const char* norm_weight;   // RmsNorm: [K]
  char* residual_out;        // RmsNorm with residual: receives x + residual; nullptr without
  int64_t residual_stride;   // elements between residual rows
  int64_t residual_out_stride;
  float eps;
};

template <typename T>
__device__ __forceinline__ uint4 load16(const char* base, int64_t elem) {
  return *reinterpret_cast<const uint4*>(base + elem * static_cast<int64_t>(sizeof(T)));
}

// ---------------------------------------------------------------- prologues
// The block passes below load the inputs of kRowGroup rows at a time before using any: enough
// loads in flight without holding all M rows' inputs in registers next to the preloaded weights.
constexpr int kRowGroup = 4;

// A prologue turns the inputs at (row m, k .. k + 7) into 8 activation values (apply). The loads
// come apart from the arithmetic (load: per row, load_common: shared by the rows), so that a pass
// can issue several rows' loads before it waits for any. prepare computes per-row statistics that
// apply takes (RmsNorm: 1 / rms); every thread of the block calls it.
template <typename T>
struct NoPrologue {
  struct In {
    uint4 x;
  };
  struct Common {};
  static __device__ __forceinline__ In load(const Problem& p, const PrologueArgs&, int m, int64_t k) {
    return {load16<T>(p.x, m * p.x_stride + k)};
  }
  static __device__ __forceinline__ Common load_common(const PrologueArgs&, int64_t) { return {}; }
  static __device__ __forceinline__ void apply(const PrologueArgs&, const In& in, const Common&, float,
                                               float (&a)[8]) {
    unpack8<T>(in.x, a);
  }
  template <int M, int kWarps>
  static __device__ __forceinline__ void prepare(const Problem&, const PrologueArgs&, float (&)[M]) {}
};

template <typename T>
struct RmsNormPrologue {
  struct In {
    uint4 x, r;
  };
  struct Common {
    uint4 w;
  };
  static __device__ __forceinline__ In load(const Problem& p, const PrologueArgs& a, int m, int64_t k) {
    In in;
    in.x = load16<T>(p.x, m * p.x_stride + k);
    in.r = a.residual != nullptr ? load16<T>(a.residual, m * a.residual_stride + k) : make_uint4(0, 0, 0, 0);
    return in;
  }
  static __device__ __forceinline__ Common load_common(const PrologueArgs& a, int64_t k) {
    return {load16<T>(a.norm_weight, k)};
  }
  // h = x + residual rounded to T (x itself without a residual): what is normalised.
  static __device__ __forceinline__ void sum(const PrologueArgs& a, const In& in, float (&h)[8]) {
    unpack8<T>(in.x, h);
    if (a.residual != nullptr) {
      float r[8];
      unpack8<T>(in.r, r);
#pragma unroll
      for (int i = 0; i < 8; ++i) h[i] = round_to_dtype<T>(__fadd_rn(h[i], r[i]));
    }
  }
  // a = T(w * T(h / rms)), inv_rms = 1 / rms.
  static __device__ __forceinline__ void apply(const PrologueArgs& a, const In& in, const Common& c, float inv_rms,
                                               float (&out)[8]) {
    float h[8], w[8];
    sum(a, in, h);
    unpack8<T>(c.w, w);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      out[i] = round_to_dtype<T>(__fmul_rn(w[i], round_to_dtype<T>(__fmul_rn(h[i], inv_rms))));
    }
  }

  // inv_rms[m] = 1 / sqrt(sum(h^2) / K + eps) over row m, for every thread of the block;
  // block 0 also writes residual_out = h (the other blocks only read x and residual). The first
  // kStatWarps warps sum, whatever the block size, so that every kernel sums in one order.
  template <int M, int kWarps>
  static __device__ void prepare(const Problem& p, const PrologueArgs& a, float (&inv_rms)[M]) {
    constexpr int kStatWarps = 4;
    static_assert(kWarps >= kStatWarps, "the sum of squares needs kStatWarps warps");
    __shared__ float partial[kStatWarps][M];
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    if (warp < kStatWarps) {
      const bool store = a.residual_out != nullptr && blockIdx.x == 0;
      float sq[M];
#pragma unroll
      for (int m = 0; m < M; ++m) sq[m] = 0.f;
      for (int64_t k = threadIdx.x * 8; k < p.k; k += kStatWarps * 32 * 8) {
#pragma unroll
        for (int m0 = 0; m0 < M; m0 += kRowGroup) {
          In in[kRowGroup];
#pragma unroll
          for (int j = 0; j < kRowGroup && m0 + j < M; ++j) in[j] = load(p, a, m0 + j, k);
#pragma unroll
          for (int j = 0; j < kRowGroup && m0 + j < M; ++j) {
            const int m = m0 + j;
            float h[8];
            sum(a, in[j], h);
            if (store) {
              *reinterpret_cast<uint4*>(a.residual_out + (m * a.residual_out_stride + k) * sizeof(T)) = pack8<T>(h);
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) sq[m] = fmaf(h[i], h[i], sq[m]);
          }
        }
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        sq[m] = warp_sum(sq[m]);
        if (lane == 0) partial[warp][m] = sq[m];
      }
    }
    __syncthreads();
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float total = partial[0][m];
#pragma unroll
      for (int w = 1; w < kStatWarps; ++w) total += partial[w][m];
      inv_rms[m] = triton_rsqrt(__fadd_rn(triton_div(total, static_cast<float>(p.k)), a.eps));
    }
  }
};

template <typename T>
struct SiluMulPrologue {
  struct In {
    uint4 gate, up;
  };
  struct Common {};
  static __device__ __forceinline__ In load(const Problem& p, const PrologueArgs&, int m, int64_t k) {
    return {load16<T>(p.x, m * p.x_stride + k), load16<T>(p.x, m * p.x_stride + p.k + k)};
  }
  static __device__ __forceinline__ Common load_common(const PrologueArgs&, int64_t) { return {}; }
  // a = T(T(g / (1 + exp(-g))) * u).
  static __device__ __forceinline__ void apply(const PrologueArgs&, const In& in, const Common&, float,
                                               float (&out)[8]) {
    float g[8], u[8];
    unpack8<T>(in.gate, g);
    unpack8<T>(in.up, u);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = silu_mul_rounded<T>(g[i], u[i]);
  }
  template <int M, int kWarps>
  static __device__ __forceinline__ void prepare(const Problem&, const PrologueArgs&, float (&)[M]) {}
};

template <typename T, int kKind>
using PrologueOf = std::conditional_t<kKind == kRmsNormPrologue, RmsNormPrologue<T>,
                                      std::conditional_t<kKind == kSiluMulPrologue, SiluMulPrologue<T>, NoPrologue<T>>>;

// ---------------------------------------------------------------- block passes
// Per-token int8 scales of the transformed rows, as per_token_quant_int8 computes them:
// scale = max(max|a|, 1e-10) / 127.5 in float32 (the maximum is exact in any order).
template <typename P, int M, int kWarps>
__device__ void int8_scales(const Problem& p, const PrologueArgs& a, const float (&stat)[M], float (&scale)[M]) {
  __shared__ float partial[kWarps][M];
  float amax[M];
#pragma unroll
  for (int m = 0; m < M; ++m) amax[m] = 0.f;
  for (int64_t k = threadIdx.x * 8; k < p.k; k += kWarps * 32 * 8) {
    const typename P::Common c = P::load_common(a, k);
#pragma unroll
    for (int m0 = 0; m0 < M; m0 += kRowGroup) {
      typename P::In in[kRowGroup];
#pragma unroll
      for (int j = 0; j < kRowGroup && m0 + j < M; ++j) in[j] = P::load(p, a, m0 + j, k);
#pragma unroll
      for (int j = 0; j < kRowGroup && m0 + j < M; ++j) {
        float v[8];
        P::apply(a, in[j], c, stat[m0 + j], v);
#pragma unroll
        for (int i = 0; i < 8; ++i) amax[m0 + j] = fmaxf(amax[m0 + j], fabsf(v[i]));
      }
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    amax[m] = warp_max(amax[m]);
    if (lane == 0) partial[warp][m] = amax[m];
  }
  __syncthreads();
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float total = partial[0][m];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) total = fmaxf(total, partial[w][m]);
    scale[m] = __fdiv_rn(fmaxf(total, 1e-10f), 127.5f);
  }
}

// round_half_even(v / scale) clamped to [-128, 127], with a true (IEEE) division: the numbers of
// per_token_quant_int8_reference.
__device__ __forceinline__ uint32_t quantize4(const float* v, float scale) {
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int q = min(127, max(-128, __float2int_rn(__fdiv_rn(v[i], scale))));
    packed |= (static_cast<uint32_t>(q) & 0xffu) << (8 * i);
  }
  return packed;
}

// Writes the transformed activations of k in [c0, c1) into the staging buffer: row m at
// stage + m * stage_stride elements, element k - c0, as T (dense weights) or int8 (W8A8).
template <typename F, typename P, typename T, int M, int kWarps>
__device__ void stage_rows(const Problem& p, const PrologueArgs& a, const float (&stat)[M], const float (&scale)[M],
                           char* stage, int64_t stage_stride, int64_t c0, int64_t c1) {
  constexpr bool kQuantize = std::is_same_v<F, Int8Format>;
  for (int64_t e = threadIdx.x * 8; c0 + e < c1; e += kWarps * 32 * 8) {
    const typename P::Common c = P::load_common(a, c0 + e);
#pragma unroll
    for (int m0 = 0; m0 < M; m0 += kRowGroup) {
      typename P::In in[kRowGroup];
#pragma unroll
      for (int j = 0; j < kRowGroup && m0 + j < M; ++j) in[j] = P::load(p, a, m0 + j, c0 + e);
#pragma unroll
      for (int j = 0; j < kRowGroup && m0 + j < M; ++j) {
        const int m = m0 + j;
        float v[8];
        P::apply(a, in[j], c, stat[m], v);
        if constexpr (kQuantize) {
          *reinterpret_cast<uint2*>(stage + m * stage_stride + e) =
              make_uint2(quantize4(v, scale[m]), quantize4(v + 4, scale[m]));
        } else {
          *reinterpret_cast<uint4*>(stage + (m * stage_stride + e) * sizeof(T)) = pack8<T>(v);
        }
      }
    }
  }
}

// Staging buffer: at most kStageBytes of dynamic shared memory (under the 48 KB that needs no
// opt-in), holding M rows of kChunk elements. kChunk is a multiple of the lane stride so that
// every chunk starts each lane on its own k pattern.
constexpr int64_t kStageBytes = 32 * 1024;
template <typename F, int M, int kStride>
constexpr int64_t stage_chunk() {
  constexpr int64_t fit = kStageBytes / (M * F::kXBytes);
  static_assert(fit >= kStride, "the staging buffer must hold one lane stride of every row");
  return fit / kStride * kStride;
}

// ---------------------------------------------------------------- the kernel
// gemv_kernel's k loop (without split-K: each warp owns R rows and walks all of K) on the
// activation the block produced (see the top of this file). F is DenseFormat<T> or Int8Format
// (then the activation is quantized here and extra.x_scale is replaced); P is the prologue.
template <typename F, typename P, typename T, int M, int R, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) gemv_prologue_kernel(Problem p, PrologueArgs a,
                                                                    typename F::Extra extra) {
  using W = Walk<F, R, false, kWarps>;
  constexpr bool kQuantize = std::is_same_v<F, Int8Format>;
  constexpr int64_t kChunk = stage_chunk<F, M, W::kStride>();
  extern __shared__ uint4 stage_vectors[];
  char* stage = reinterpret_cast<char*>(stage_vectors);

  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x / 32;
  const int64_t row0 = W::row0(warp);
  // Warps past N (in the last block) still take part in the block's passes and barriers.
  const bool active = row0 < p.n;
  typename F::Acc acc[M][R];
  W::zero(acc);
  const char* wrow[R];
  PlainOutput::rows<F, R>(p, row0, wrow);
  uint4 wv[W::kUnroll][R];
  const int64_t k_first = W::k_first(lane, warp);
  const int64_t chunk = min(p.k, kChunk);
  // The first weights go out before the statistics, so their DRAM latency overlaps the prologue.
  bool preloaded = active && W::preload(wv, wrow, k_first, chunk);
  pdl_wait();  // the weights above are not written by any kernel; x and the residual may be

  float stat[M], scale[M];  // RmsNorm: 1 / rms of each row; int8: each row's quantization scale
#pragma unroll
  for (int m = 0; m < M; ++m) stat[m] = scale[m] = 0.f;
  P::template prepare<M, kWarps>(p, a, stat);
  if constexpr (kQuantize) {
    __shared__ float x_scale[M];
    int8_scales<P, M, kWarps>(p, a, stat, scale);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (threadIdx.x == m) x_scale[m] = scale[m];  // read by the epilogue, after the barriers below
    }
    extra.x_scale = x_scale;
  }

  for (int64_t c0 = 0; c0 < p.k; c0 += chunk) {  // (K > 0: at least one barrier below)
    const int64_t c1 = min(p.k, c0 + chunk);
    if (c0 != 0) {
      preloaded = active && W::preload(wv, wrow, c0 + k_first, c1);
      __syncthreads();  // every warp is done with the previous chunk
    }
    stage_rows<F, P, T, M, kWarps>(p, a, stat, scale, stage, chunk, c0, c1);
    __syncthreads();
    if (active) W::template accumulate<M>(stage, chunk, c0, wrow, c0 + k_first, c1, preloaded, wv, acc);
  }
  if (!active) return;
  if (W::template reduce<M>(acc, lane, warp)) PlainOutput::write<F, T, M, R>(p, extra, acc, row0);
}

// ---------------------------------------------------------------- host side
// A prologue kernel's block: kWarps warps of R rows each.
struct PrologueTiling {
  int rows;
  int warps;
};

// The prologue (the inputs read, the activation computed, one or two reductions) costs the same
// in every block, so these blocks cover many rows: 4 per warp and 8 warps (16 for long rows,
// which keep more warps busy per block; with at most 2 activation rows, so that 4 weight rows
// per warp still fit in registers at 512 threads), down to 2 or 1 row per warp and then 8 warps
// while that leaves fewer blocks than half the SMs. Measured on an H200 at the Qwen3-0.6B and
// 8B decode shapes against 4, 8 and 16 warps of 1, 2 and 4 rows (and split-K, always slower
// here): within 5% of the best in all but one of the cases where the fused kernel beats the
// unfused pair (11% there), within 1.9x elsewhere.
constexpr int kMaxRowsM16 = 2;
inline PrologueTiling choose_prologue_tiling(int64_t n, int64_t m, int64_t k, int sms) {
  PrologueTiling t{4, k >= 8192 && m <= kMaxRowsM16 ? 16 : 8};
  while (t.rows > 1 && 2 * n < static_cast<int64_t>(t.rows) * t.warps * sms) t.rows /= 2;
  if (t.warps > 8 && 2 * n < static_cast<int64_t>(t.rows) * t.warps * sms) t.warps = 8;
  return t;
}

template <typename F, typename P, typename T, int M, int R, int kWarps>
void launch_prologue(const Problem& p, const PrologueArgs& a, const typename F::Extra& extra, cudaStream_t stream,
                     bool pdl) {
  using W = Walk<F, R, false, kWarps>;
  const int64_t blocks = ceil_div(p.n, static_cast<int64_t>(R) * kWarps);
  const int64_t chunk = std::min<int64_t>(p.k, stage_chunk<F, M, W::kStride>());
  const size_t smem = static_cast<size_t>(M * chunk * F::kXBytes);  // <= kStageBytes: no opt-in needed
  launch_kernel(gemv_prologue_kernel<F, P, T, M, R, kWarps>, dim3(static_cast<unsigned>(blocks)), dim3(kWarps * 32),
                smem, stream, pdl, p, a, extra);
}

// Instantiates the launch for the batch's row count (1..8) and the tiling (R in {1, 2, 4} rows
// per warp, 8 warps, or 16 warps for up to kMaxRowsM16 activation rows).
template <typename F, typename P, typename T>
void dispatch_prologue(const Problem& p, int64_t m, const PrologueTiling& t, const PrologueArgs& a,
                       const typename F::Extra& extra, cudaStream_t stream, bool pdl) {
  with_rows(m, [&](auto mc) {
    constexpr int M = decltype(mc)::value;
    if constexpr (M <= kMaxRowsM16) {
      if (t.warps == 16) {
        if (t.rows == 4) return launch_prologue<F, P, T, M, 4, 16>(p, a, extra, stream, pdl);
        if (t.rows == 2) return launch_prologue<F, P, T, M, 2, 16>(p, a, extra, stream, pdl);
        return launch_prologue<F, P, T, M, 1, 16>(p, a, extra, stream, pdl);
      }
    }
    if (t.rows == 4) return launch_prologue<F, P, T, M, 4, 8>(p, a, extra, stream, pdl);
    if (t.rows == 2) return launch_prologue<F, P, T, M, 2, 8>(p, a, extra, stream, pdl);
    return launch_prologue<F, P, T, M, 1, 8>(p, a, extra, stream, pdl);
  });
}

// `forced` 0 picks with choose_prologue_tiling; else it names a compiled tiling as
// 100 * warps + rows (e.g. 804), for benchmarks on other GPUs.
inline PrologueTiling prologue_tiling(const Problem& p, int64_t m, int device, int64_t forced) {
  if (forced == 0) return choose_prologue_tiling(p.n, m, p.k, sm_count(device));
  const PrologueTiling t{static_cast<int>(forced % 100), static_cast<int>(forced / 100)};
  TVM_FFI_CHECK((t.rows == 1 || t.rows == 2 || t.rows == 4) && (t.warps == 8 || (t.warps == 16 && m <= kMaxRowsM16)),
                ValueError)
      << "no compiled prologue tiling " << forced << " for " << m << " rows (100 * warps + rows: warps 8, or 16 for "
      << "up to " << kMaxRowsM16 << " rows; rows 1, 2 or 4)";
  return t;
}

// Checks the prologue's inputs against x [M, *] and K; returns them as kernel arguments.
template <typename T, int kKind>
PrologueArgs make_prologue_args(const TensorView& x, int64_t k, const Optional<TensorView>& residual,
                                const Optional<TensorView>& norm_weight, const Optional<TensorView>& residual_out,
                                double eps) {
  PrologueArgs a{nullptr, nullptr, nullptr, 0, 0, static_cast<float>(eps)};
  TVM_FFI_CHECK(x.dtype().bits == sizeof(T) * 8, TypeError) << "x must be float16 or bfloat16 (the kernel's dtype)";
  auto check_rows = [&](const TensorView& t, const char* name) {
    TVM_FFI_CHECK(t.ndim() == 2 && t.size(0) == x.size(0) && t.size(1) == k && t.stride(1) == 1 && same_dtype(t, x),
                  ValueError)
        << name << " must be [M, K] with unit inner stride and x's dtype";
    TVM_FFI_CHECK(widest_access({reinterpret_cast<uint64_t>(byte_ptr(t)),
                                 static_cast<uint64_t>(t.stride(0) * static_cast<int64_t>(sizeof(T)))}) == 16,
                  ValueError)
        << name << " must be 16-byte aligned with a row stride of a multiple of 16 bytes";
  };
  if constexpr (kKind == kRmsNormPrologue) {
    TVM_FFI_CHECK(norm_weight.has_value(), ValueError) << "rmsnorm needs norm_weight";
    const TensorView& nw = norm_weight.value();
    TVM_FFI_CHECK(nw.ndim() == 1 && nw.size(0) == k && (k <= 1 || nw.stride(0) == 1) && same_dtype(nw, x) &&
                      reinterpret_cast<uint64_t>(byte_ptr(nw)) % 16 == 0,
                  ValueError)
        << "norm_weight must be a contiguous, 16-byte aligned [K] tensor of x's dtype";
    a.norm_weight = byte_ptr(nw);
    TVM_FFI_CHECK(residual.has_value() == residual_out.has_value(), ValueError)
        << "residual and residual_out go together";
    if (residual.has_value()) {
      check_rows(residual.value(), "residual");
      check_rows(residual_out.value(), "residual_out");
      a.residual = byte_ptr(residual.value());
      a.residual_stride = residual.value().stride(0);
      a.residual_out = byte_ptr(residual_out.value());
      a.residual_out_stride = residual_out.value().stride(0);
    }
  } else {
    TVM_FFI_CHECK(!residual.has_value() && !norm_weight.has_value() && !residual_out.has_value(), ValueError)
        << "residual, norm_weight and residual_out belong to the rmsnorm prologue";
  }
  return a;
}

}  // namespace gemv_detail

// y [M, N] = a @ w[N, K]^T (+ bias [N]) with a = the prologue kKind (kRmsNormPrologue or
// kSiluMulPrologue) applied to x, for 1 <= M <= 8; T in {__half, __nv_bfloat16}.
//   rmsnorm:  x [M, K], norm_weight [K], optional residual and residual_out [M, K], eps;
//   silu_mul: x [M, 2K] (gate | up); residual, norm_weight and residual_out must be absent.
// tiling: 0, or a forced tiling for benchmarks (see prologue_tiling); pdl as in gemv (gemv.cuh).
template <typename T, int kKind>
void gemv_prologue(TensorView x, Optional<TensorView> residual, Optional<TensorView> norm_weight,
                   Optional<TensorView> residual_out, double eps, TensorView w, Optional<TensorView> bias,
                   TensorView y, int64_t tiling, bool pdl) {
  using namespace gemv_detail;
  static_assert(kKind == kRmsNormPrologue || kKind == kSiluMulPrologue, "gemv_prologue needs a prologue");
  const Problem p = make_problem(x, w, bias, y, sizeof(T), sizeof(T), 8, kKind == kSiluMulPrologue ? 2 : 1);
  TVM_FFI_CHECK(p.k > 0, ValueError) << "K must be positive";
  const PrologueArgs a = make_prologue_args<T, kKind>(x, p.k, residual, norm_weight, residual_out, eps);
  if (p.n == 0) return;  // (residual_out is then left unwritten; the wrapper handles N == 0)
  tvm::ffi::CUDADeviceGuard guard(x.device().device_id);
  const cudaStream_t stream = current_stream(x);
  const PrologueTiling t = prologue_tiling(p, x.size(0), x.device().device_id, tiling);
  dispatch_prologue<DenseFormat<T>, PrologueOf<T, kKind>, T>(p, x.size(0), t, a, {}, stream, pdl);
}

// The W8A8 GEMV from fp16/bf16 activations: a = the prologue kKind (kNoPrologue too) applied to
// x, quantized per token in the kernel exactly as per_token_quant_int8_reference does; then
// y [M, N] = (a_int8 @ w_int8[N, K]^T) * a_scale[M] * w_scale[N] (+ bias [N]) in T, as gemv_w8a8.
template <typename T, int kKind>
void gemv_w8a8_dynamic(TensorView x, Optional<TensorView> residual, Optional<TensorView> norm_weight,
                       Optional<TensorView> residual_out, double eps, TensorView w, TensorView w_scale,
                       Optional<TensorView> bias, TensorView y, int64_t tiling, bool pdl) {
  using namespace gemv_detail;
  Problem p = make_problem(x, w, bias, y, sizeof(T), 1, 16, kKind == kSiluMulPrologue ? 2 : 1);
  check_w_scale(w_scale, p.n);
  TVM_FFI_CHECK(same_dtype(x, y), TypeError) << "y must have x's dtype";
  TVM_FFI_CHECK(p.k > 0, ValueError) << "K must be positive";
  const PrologueArgs a = make_prologue_args<T, kKind>(x, p.k, residual, norm_weight, residual_out, eps);
  if (p.n == 0) return;
  const Int8Format::Extra extra{nullptr, reinterpret_cast<const float*>(byte_ptr(w_scale))};
  tvm::ffi::CUDADeviceGuard guard(x.device().device_id);
  const cudaStream_t stream = current_stream(x);
  const PrologueTiling t = prologue_tiling(p, x.size(0), x.device().device_id, tiling);
  dispatch_prologue<Int8Format, PrologueOf<T, kKind>, T>(p, x.size(0), t, a, extra, stream, pdl);
}

}  // namespace mllm_kernel
