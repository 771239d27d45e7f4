// GEMV for small-batch decode: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for M <= 8 rows.
//
// Decode multiplies a handful of activation rows by every weight of the model, so the step is
// bound by reading W once. cuBLAS picks tensor-core GEMM tiles (and split-K reductions, a second
// kernel) that reach about half the copy bandwidth on these shapes. Here each warp streams whole
// weight rows with 16-byte loads that bypass L1, keeps every activation row in registers per
// step, and reduces with shuffles: one kernel, no workspace, safe inside CUDA graphs.
//
// Two weight formats share the loop:
//  * dense fp16/bf16 weights (unquantized linear layers), fp32 accumulation;
//  * int8 weights with per-channel scales (W8A8) and int8 activations with per-token scales:
//    the dot products run on dp4a in exact int32 and the epilogue applies
//    (acc * scale_x) * scale_w (+ bias), the int8 GEMM's order. gemv_w8a8 below takes the
//    activations already quantized (per_token_quant_int8); gemv_prologue.cuh adds the entries
//    that quantize fp16/bf16 activations inside the kernel, optionally after an RMSNorm or a
//    SiLU-and-mul, so a decode step launches one kernel where it launched two or three.
#pragma once

#include <type_traits>

#include "common.cuh"
#include "pdl.cuh"

namespace mllm_kernel {
namespace gemv_detail {

constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpsPerBlock * 32;
constexpr int kMaxRowsM = 8;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <typename T>
struct Half2Of;
template <>
struct Half2Of<__half> {
  using type = __half2;
  static __device__ __forceinline__ float2 to_float2(type v) { return __half22float2(v); }
  static __device__ __forceinline__ type from_float2(float a, float b) { return __floats2half2_rn(a, b); }
};
template <>
struct Half2Of<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(type v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ type from_float2(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

// 8 consecutive fp16/bf16 values (one 16-byte vector) -> 8 floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&out)[8]) {
  using H2 = typename Half2Of<T>::type;
  const H2* h = reinterpret_cast<const H2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = Half2Of<T>::to_float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 8 floats -> 8 consecutive fp16/bf16 values (one 16-byte vector), each rounded to nearest.
template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&v)[8]) {
  using H2 = typename Half2Of<T>::type;
  uint4 out;
  H2* h = reinterpret_cast<H2*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = Half2Of<T>::from_float2(v[2 * i], v[2 * i + 1]);
  return out;
}

struct Problem {
  const char* x;
  const char* w;
  const char* bias;  // nullptr without bias
  char* y;
  int64_t x_stride;  // elements between activation rows
  int64_t y_stride;  // elements between output rows
  int64_t n;
  int64_t k;
};

// ---------------------------------------------------------------- weight formats
// A format says how one 16-byte weight vector meets the matching activations: how many k it
// covers, how a lane loads and converts its slice of an activation row once (reused for all R
// weight rows), the dot product, and the epilogue from the warp's total to the output value.

// fp16/bf16 weights and activations, float32 accumulation.
template <typename T>
struct DenseFormat {
  using Acc = float;
  static constexpr int kElems = 8;
  struct X {
    float v[8];
  };
  struct Extra {};
  static __device__ __forceinline__ X load_x(const char* row, int64_t k0) {
    X x;
    unpack8<T>(*reinterpret_cast<const uint4*>(reinterpret_cast<const T*>(row) + k0), x.v);
    return x;
  }
  static __device__ __forceinline__ void dot(const uint4& wv, const X& x, Acc& acc) {
    float wf[8];
    unpack8<T>(wv, wf);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc = fmaf(wf[i], x.v[i], acc);
  }
  static __device__ __forceinline__ float finish(Acc total, int m, int64_t row, const Extra&) { return total; }
  static constexpr int64_t kXBytes = sizeof(T);
  static constexpr int64_t kWBytes = sizeof(T);
};

// int8 weights and per-token int8 activations (W8A8): dp4a sums the products exactly in int32,
// then (acc * scale_x) * scale_w in float32, the order of the int8 GEMM's epilogue.
struct Int8Format {
  using Acc = int;
  static constexpr int kElems = 16;
  struct X {
    uint4 v;
  };
  struct Extra {
    const float* x_scale;  // [M]
    const float* w_scale;  // [N]
  };
  static __device__ __forceinline__ X load_x(const char* row, int64_t k0) {
    return X{*reinterpret_cast<const uint4*>(row + k0)};
  }
  static __device__ __forceinline__ void dot(const uint4& wv, const X& x, Acc& acc) {
    const int* wq = reinterpret_cast<const int*>(&wv);
    const int* xq = reinterpret_cast<const int*>(&x.v);
#pragma unroll
    for (int j = 0; j < 4; ++j) acc = __dp4a(wq[j], xq[j], acc);
  }
  static __device__ __forceinline__ float finish(Acc total, int m, int64_t row, const Extra& e) {
    // Explicit rounding: nvcc would otherwise fuse the scaling with the bias add into an FMA,
    // which rounds once where the reference rounds twice.
    return __fmul_rn(__fmul_rn(static_cast<float>(total), e.x_scale[m]), e.w_scale[row]);
  }
  static constexpr int64_t kXBytes = 1;
  static constexpr int64_t kWBytes = 1;
};

// ---------------------------------------------------------------- the k loop
// Without split-K, warp w of the grid owns output rows [w * R, w * R + R) and walks all of K.
// With split-K (small N: too few rows to keep the GPU's memory pipes full), the kWarps warps of
// a block share R rows and take every kWarps-th step of K, then reduce through shared memory.
// A lane covers kElems consecutive k per step; kUnroll steps are loaded before any is used, so
// each lane keeps kUnroll * R 16-byte weight loads in flight. gemv_kernel below and the prologue
// kernel (gemv_prologue.cuh) are built from these pieces.
template <typename F, int R, bool kSplitK, int kWarps>
struct Walk {
  using Acc = typename F::Acc;
  static constexpr int kUnroll = R >= 4 ? 2 : 4;
  static constexpr int kStride = 32 * F::kElems * (kSplitK ? kWarps : 1);  // k between a lane's steps

  // The first of this warp's R weight rows.
  static __device__ __forceinline__ int64_t row0(int warp) {
    return (kSplitK ? static_cast<int64_t>(blockIdx.x) : static_cast<int64_t>(blockIdx.x) * kWarps + warp) * R;
  }
  // k of this lane's first step.
  static __device__ __forceinline__ int64_t k_first(int lane, int warp) {
    return (static_cast<int64_t>(kSplitK ? warp : 0) * 32 + lane) * F::kElems;
  }
  template <int M>
  static __device__ __forceinline__ void zero(Acc (&acc)[M][R]) {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[m][r] = Acc(0);
  }

  template <int kSteps>
  static __device__ __forceinline__ void load(uint4 (&wv)[kUnroll][R], const char* const (&wrow)[R], int64_t k0) {
#pragma unroll
    for (int u = 0; u < kSteps; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r) wv[u][r] = load_streaming(wrow[r] + (k0 + u * kStride) * F::kWBytes);
  }

  // Issues the weight loads of accumulate's first iteration over [k0, k_end) ahead of time, so
  // that their latency overlaps other work; returns whether it issued any.
  static __device__ __forceinline__ bool preload(uint4 (&wv)[kUnroll][R], const char* const (&wrow)[R], int64_t k0,
                                                 int64_t k_end) {
    if (k0 + (kUnroll - 1) * kStride < k_end) {
      load<kUnroll>(wv, wrow, k0);
      return true;
    }
    if (k0 < k_end) {
      load<1>(wv, wrow, k0);
      return true;
    }
    return false;
  }

  // acc[m][r] += x[m, k] * w[row r, k] over this lane's steps k0, k0 + kStride, ... < k_end.
  // Activation row m starts at x + m * x_stride * kXBytes and holds k from x_k0 on. With
  // `preloaded`, the first iteration's weights are already in wv (see preload).
  template <int M>
  static __device__ __forceinline__ void accumulate(const char* x, int64_t x_stride, int64_t x_k0,
                                                    const char* const (&wrow)[R], int64_t k0, int64_t k_end,
                                                    bool preloaded, uint4 (&wv)[kUnroll][R], Acc (&acc)[M][R]) {
    for (; k0 + (kUnroll - 1) * kStride < k_end; k0 += kUnroll * kStride) {
      if (!preloaded) load<kUnroll>(wv, wrow, k0);
      preloaded = false;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const typename F::X xs = F::load_x(x + m * x_stride * F::kXBytes, k0 + u * kStride - x_k0);
#pragma unroll
          for (int r = 0; r < R; ++r) F::dot(wv[u][r], xs, acc[m][r]);
        }
    }
    for (; k0 < k_end; k0 += kStride) {  // the tail: fewer than kUnroll steps left
      if (!preloaded) load<1>(wv, wrow, k0);
      preloaded = false;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const typename F::X xs = F::load_x(x + m * x_stride * F::kXBytes, k0 - x_k0);
#pragma unroll
        for (int r = 0; r < R; ++r) F::dot(wv[0][r], xs, acc[m][r]);
      }
    }
  }

  // Sums acc over the warp's lanes (and under split-K over the block's warps, into warp 0's acc);
  // true in the thread that then holds the totals: lane 0 (of warp 0 under split-K). Under
  // split-K every warp of the block must get here.
  template <int M>
  static __device__ __forceinline__ bool reduce(Acc (&acc)[M][R], int lane, int warp) {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[m][r] = warp_sum(acc[m][r]);
    if constexpr (kSplitK) {
      __shared__ Acc partial[kWarps][M * R];
      if (lane == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
          for (int r = 0; r < R; ++r) partial[warp][m * R + r] = acc[m][r];
      }
      __syncthreads();
      if (warp != 0) return false;
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) {
          Acc total = partial[0][m * R + r];
#pragma unroll
          for (int w = 1; w < kWarps; ++w) total += partial[w][m * R + r];
          acc[m][r] = total;
        }
    }
    return lane == 0;
  }
};

// ---------------------------------------------------------------- outputs
// An output policy says which weight rows a warp's R rows are, given its first output out0, and
// what the thread holding the summed products writes. PlainOutput: row r is output out0 + r and
// y = the format's epilogue (+ bias). gemv_gated.cuh adds the gate/up pairs of the gated GEMV.
struct PlainOutput {
  static constexpr int kWeightRows = 1;  // weight rows per output

  // Rows past N (only in the last warp when N % R != 0) re-read the last row and are dropped.
  template <typename F, int R>
  static __device__ __forceinline__ void rows(const Problem& p, int64_t out0, const char* (&wrow)[R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) wrow[r] = p.w + min(out0 + r, p.n - 1) * p.k * F::kWBytes;
  }

  template <typename F, typename T, int M, int R>
  static __device__ __forceinline__ void write(const Problem& p, const typename F::Extra& extra,
                                               const typename F::Acc (&acc)[M][R], int64_t out0) {
    const T* bias = reinterpret_cast<const T*>(p.bias);
    T* y = reinterpret_cast<T*>(p.y);
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t row = out0 + r;
        if (row >= p.n) continue;
        float v = F::finish(acc[m][r], m, row, extra);
        if (bias != nullptr) v = __fadd_rn(v, static_cast<float>(bias[row]));
        y[m * p.y_stride + row] = from_float<T>(v);
      }
  }
};

// ---------------------------------------------------------------- the kernel
// Under programmatic dependent launch (pdl.cuh) the first weight loads are issued before the
// wait for the previous kernel, so they overlap its tail; x, the scales it wrote and y wait.
template <typename F, typename T, int M, int R, bool kSplitK, typename Out>
__global__ void __launch_bounds__(kThreads) gemv_kernel(Problem p, typename F::Extra extra) {
  using W = Walk<F, R, kSplitK, kWarpsPerBlock>;
  static_assert(R % Out::kWeightRows == 0, "a warp takes whole outputs");
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x / 32;
  const int64_t out0 = W::row0(warp) / Out::kWeightRows;  // the warp's first output
  const bool active = out0 < p.n;  // false for whole blocks only under split-K: no barrier is skipped
  const char* wrow[R];
  Out::template rows<F, R>(p, out0, wrow);
  uint4 wv[W::kUnroll][R];
  const int64_t k0 = W::k_first(lane, warp);
  const bool preloaded = active && W::preload(wv, wrow, k0, p.k);
  pdl_wait();
  if (!active) return;

  typename F::Acc acc[M][R];
  W::zero(acc);
  W::template accumulate<M>(p.x, p.x_stride, 0, wrow, k0, p.k, preloaded, wv, acc);
  if (W::template reduce<M>(acc, lane, warp)) Out::template write<F, T, M, R>(p, extra, acc, out0);
}

// ---------------------------------------------------------------- host side
// How a launch covers the rows: R rows per warp, and whether a block's warps split K.
struct Tiling {
  int rows;
  bool split_k;
};

// With one activation row: as many rows per warp as keep >= 16 warps per SM busy, and split-K
// when even one row per warp leaves fewer warps than that. With several rows, each activation
// vector is re-read from L1 once per weight row it meets, which soon costs more than the weight
// stream itself: 4 rows per warp cut those re-reads by 4 (split-K keeps the warp count up).
inline Tiling choose_tiling(int64_t n, int64_t m, int sms) {
  const int64_t busy = 16LL * sms;
  if (m > 1 && n % 4 == 0) return {4, n / 4 < busy};
  for (int r : {4, 2}) {
    if (n / r >= busy) return {r, false};
  }
  return {1, n < busy};
}

// `forced` 0 picks with choose_tiling; else it names a compiled tiling as rows + 10 * split_k
// (1, 2, 4, 11 or 14), which callers choose by measurement (pymllm's GEMV dispatcher) or force
// in benchmarks.
inline Tiling gemv_tiling(int64_t n, int64_t m, int device, int64_t forced) {
  if (forced == 0) return choose_tiling(n, m, sm_count(device));
  TVM_FFI_CHECK(forced == 1 || forced == 2 || forced == 4 || forced == 11 || forced == 14, ValueError)
      << "no compiled GEMV tiling " << forced << " (rows per warp + 10 * split-K: 1, 2, 4, 11 or 14)";
  return {static_cast<int>(forced % 10), forced >= 10};
}

template <typename F, typename T, int M, int R, bool kSplitK, typename Out>
void launch(const Problem& p, const typename F::Extra& extra, cudaStream_t stream, bool pdl) {
  // warps (or, under split-K, blocks) with R weight rows each
  const int64_t groups = ceil_div(p.n, static_cast<int64_t>(R / Out::kWeightRows));
  const int64_t blocks = kSplitK ? groups : ceil_div(groups, kWarpsPerBlock);
  launch_kernel(gemv_kernel<F, T, M, R, kSplitK, Out>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream,
                pdl, p, extra);
}

// Calls fn(std::integral_constant<int, M>{}) for the batch's row count M, so that one compiled
// library serves every decode batch size (1..8).
template <typename Fn>
void with_rows(int64_t m, Fn&& fn) {
  TVM_FFI_CHECK(m >= 1 && m <= kMaxRowsM, ValueError) << "gemv serves 1.." << kMaxRowsM << " rows, got " << m;
  switch (m) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    case 6: return fn(std::integral_constant<int, 6>{});
    case 7: return fn(std::integral_constant<int, 7>{});
    default: return fn(std::integral_constant<int, 8>{});
  }
}

// Instantiates the launch for the batch's row count (1..8) and the tiling: 4 or 2 weight rows
// per warp, else the fewest the output policy allows (1 plain, 2 gated), split-K with 4 or that.
template <typename F, typename T, typename Out = PlainOutput>
void dispatch(const Problem& p, int64_t m, const Tiling& t, const typename F::Extra& extra, cudaStream_t stream,
              bool pdl) {
  constexpr int kFewest = Out::kWeightRows;
  with_rows(m, [&](auto mc) {
    constexpr int M = decltype(mc)::value;
    if (t.split_k) {
      if (t.rows == 4) return launch<F, T, M, 4, true, Out>(p, extra, stream, pdl);
      return launch<F, T, M, kFewest, true, Out>(p, extra, stream, pdl);
    }
    if (t.rows == 4) return launch<F, T, M, 4, false, Out>(p, extra, stream, pdl);
    if (t.rows == 2) return launch<F, T, M, 2, false, Out>(p, extra, stream, pdl);
    return launch<F, T, M, kFewest, false, Out>(p, extra, stream, pdl);
  });
}

inline bool same_dtype(const TensorView& a, const TensorView& b) {
  return a.dtype().code == b.dtype().code && a.dtype().bits == b.dtype().bits && a.dtype().lanes == b.dtype().lanes;
}

// Shape and layout guards for direct callers; the Python wrappers give the user-facing errors.
// x is [M, x_width * K]: x_width 2 for the SiLU-and-mul prologue (gate and up halves). w has
// w_rows_per_y * N rows for y [M, N]: 2 for the gated GEMV (gate rows, then up rows); bias has
// one entry per row of w.
inline Problem make_problem(const TensorView& x, const TensorView& w, const Optional<TensorView>& bias,
                            const TensorView& y, int64_t x_elem, int64_t w_elem, int64_t k_align,
                            int64_t x_width = 1, int64_t w_rows_per_y = 1) {
  TVM_FFI_CHECK(x.ndim() == 2 && w.ndim() == 2 && y.ndim() == 2, ValueError) << "x, w and y must be 2-D";
  TVM_FFI_CHECK(y.size(0) == x.size(0), ValueError) << "x and y must have the same number of rows";
  const int64_t n = y.size(1), k = w.size(1);
  TVM_FFI_CHECK(x.size(1) == x_width * k && w.size(0) == w_rows_per_y * n, ValueError)
      << "x [M, " << (x_width == 1 ? "" : "2 * ") << "K], w [" << (w_rows_per_y == 1 ? "" : "2 * ")
      << "N, K] and y [M, N] disagree";
  TVM_FFI_CHECK(k % k_align == 0, ValueError) << "K must be a multiple of " << k_align;
  TVM_FFI_CHECK(x.stride(1) == 1 && w.stride(1) == 1 && y.stride(1) == 1 && w.stride(0) == k, ValueError)
      << "x and y need unit inner stride and w must be contiguous";
  TVM_FFI_CHECK(x.dtype().bits == x_elem * 8 && w.dtype().bits == w_elem * 8, TypeError) << "unexpected dtypes";
  const char* bias_ptr = nullptr;
  if (bias.has_value()) {
    const TensorView& b = bias.value();
    TVM_FFI_CHECK(b.ndim() == 1 && b.size(0) == w.size(0) && (b.size(0) <= 1 || b.stride(0) == 1) &&
                      same_dtype(b, y),
                  ValueError)
        << "bias must be a contiguous tensor of the activation dtype with one entry per row of w";
    bias_ptr = byte_ptr(b);
  }
  const Problem p{byte_ptr(x), byte_ptr(w), bias_ptr, byte_ptr(y), x.stride(0), y.stride(0), n, k};
  // 16-byte vector loads of x rows and w rows.
  TVM_FFI_CHECK(widest_access({reinterpret_cast<uint64_t>(p.x), reinterpret_cast<uint64_t>(p.w),
                               static_cast<uint64_t>(p.x_stride * x_elem)}) == 16,
                ValueError)
      << "x and w must be 16-byte aligned, x's row stride a multiple of 16 bytes";
  return p;
}

inline void check_w_scale(const TensorView& w_scale, int64_t n) {
  TVM_FFI_CHECK(w_scale.ndim() == 1 && w_scale.size(0) == n && w_scale.dtype().bits == 32 &&
                    (n <= 1 || w_scale.stride(0) == 1),
                ValueError)
      << "w_scale must be a contiguous float32 [N] tensor";
}

}  // namespace gemv_detail

// y [M, N] = x [M, K] @ w[N, K]^T (+ bias [N]) for 1 <= M <= 8; T in {__half, __nv_bfloat16}.
// tiling: 0, or a forced tiling (see gemv_tiling); pdl: launch as a programmatic dependent of the
// previous kernel (SM90+; pdl.cuh).
template <typename T>
void gemv(TensorView x, TensorView w, Optional<TensorView> bias, TensorView y, int64_t tiling, bool pdl) {
  using namespace gemv_detail;
  const Problem p = make_problem(x, w, bias, y, sizeof(T), sizeof(T), 8);
  if (p.n == 0) return;
  tvm::ffi::CUDADeviceGuard guard(x.device().device_id);
  const cudaStream_t stream = current_stream(x);
  const Tiling t = gemv_tiling(p.n, x.size(0), x.device().device_id, tiling);
  dispatch<DenseFormat<T>, T>(p, x.size(0), t, {}, stream, pdl);
}

// y [M, N] = (x_int8 [M, K] @ w_int8[N, K]^T) * x_scale[M] * w_scale[N] (+ bias [N]) in T:
// the W8A8 GEMM for 1..8 rows, with x quantized per token beforehand (gemv_w8a8_dynamic in
// gemv_prologue.cuh quantizes inside the kernel). tiling and pdl as in gemv.
template <typename T>
void gemv_w8a8(TensorView x, TensorView x_scale, TensorView w, TensorView w_scale, Optional<TensorView> bias,
               TensorView y, int64_t tiling, bool pdl) {
  using namespace gemv_detail;
  const Problem p = make_problem(x, w, bias, y, 1, 1, 16);
  check_w_scale(w_scale, p.n);
  TVM_FFI_CHECK(x_scale.numel() == x.size(0) && x_scale.dtype().bits == 32 &&
                    (x_scale.numel() <= 1 || x_scale.stride(0) == 1),
                ValueError)
      << "x_scale must be a contiguous float32 tensor with one scale per row of x";
  TVM_FFI_CHECK(y.dtype().bits == sizeof(T) * 8, TypeError) << "y has the wrong dtype";
  if (p.n == 0) return;
  const Int8Format::Extra extra{reinterpret_cast<const float*>(byte_ptr(x_scale)),
                                 reinterpret_cast<const float*>(byte_ptr(w_scale))};
  tvm::ffi::CUDADeviceGuard guard(x.device().device_id);
  const cudaStream_t stream = current_stream(x);
  const Tiling t = gemv_tiling(p.n, x.size(0), x.device().device_id, tiling);
  dispatch<Int8Format, T>(p, x.size(0), t, extra, stream, pdl);
}

}  // namespace mllm_kernel
