// w4a16_gemv: decode-sized GEMM with 4-bit weights, out[m, n] = sum_k x[m, k] * w[k, n] (+ bias[n])
// for M = 1..64 rows of fp16/bf16 activations, in the runtime layout of pymllm's W4A16 scheme:
//   qweight [K/8, N] int32: word (j, n) holds w[8j + i, n] + 8 in bits 4i..4i+3;
//   scales  [K/G, N], zeros [K/G, N] (optional), both of x's dtype;
//   w[k, n] = (q - 8 - zero[k / G, n]) * scale[k / G, n].
// The gated form multiplies a stacked [gate | up] weight (N = 2H columns) and writes
// out[m, j] = silu(gate_j) * up_j, [M, H]: the SiLU-and-mul of a gated MLP as the epilogue.
//
// Decode reads every weight once and is bound by HBM bandwidth, so the kernel is built around the
// loads: lane (g, t) = (lane / 4, lane % 4) loads the 4 words of columns 4g..4g+3 of packed row t,
// so one 16-byte load instruction of a warp reads 4 rows x 128 contiguous bytes, and each lane
// issues kSteps x kSubtiles of them (a "batch") before using any.
//
// The arithmetic runs on tensor cores (mma.m16n8k16, fp32 accumulation): a CUDA-core GEMV would
// spend 8 * M FMAs per weight, which cannot keep up with HBM at M = 8, while an MMA costs the
// same for any M <= 8. Its 16 A rows are weight columns, its 8 B columns the activation rows
// (lanes g >= M repeat row M - 1; those output columns are never written). 9..16 rows run as two
// such groups of 8 that share every unpacked weight (the wide instance, M = 16 with the row count
// at run time): one pass over the weights instead of two launches. Past 16 rows the wide instance
// takes chunks of 16 rows in blocks next to each other in the grid (chunk fastest), which run at
// about the same time and read the same weights, so L2 serves the later reads of a line from the
// first one's fill: the weights cross HBM about once. A sum over k may run in
// any order both operands agree on, so the k order inside an MMA is chosen for cheap unpacking:
// nibble i pairs with nibble i + 4 (bits 4i and 16 + 4i are the two halves of a half2 after one
// mask), and the activations are permuted to match with byte_perm. Unpacking a word of 8 weights
// takes ~7 (bf16) or ~9 (fp16) instructions, see Traits (int4_traits.cuh).
//
// Scales and zero points are applied in fp32 to partial sums over a fold window (1 or 2 steps of
// 32 k inside one group):
//   sum_k (q - 8 - z) * s * x = s * (sum_k (q - 8) * x - z * sum_k x),
// the formula above without rounding w to 16 bits; sum_k x comes from one more MMA against ones.
//
// Split K in one launch: blocks of one column tile that cover different K chunks write fp32
// partials to a workspace; the last block to finish (a per-tile counter) adds them in a fixed
// order (deterministic), writes the output and resets the counter to zero, so the workspace is
// ready for the next launch and the kernel can be replayed in a CUDA graph.
//
// One activation row (a decode step at batch 1) has its own kernel, w4a16_gemv_one_row.cuh:
// the same arithmetic with the weights streamed through shared memory; the host picks it.
#pragma once

#include "common.cuh"
#include "pdl.cuh"
#include "triton_math.cuh"
#include "w4a16_gemv/int4_traits.cuh"

namespace mllm_kernel {
namespace w4a16_gemv_detail {

constexpr int kWarps = 4;                 // warps per block, each on its own K batches
constexpr int kThreads = 32 * kWarps;
constexpr int kSubtiles = 2;              // 32-column subtiles per warp
constexpr int kTileN = 32 * kSubtiles;    // columns per block (the Python wrapper mirrors it)
constexpr int kSteps = 4;                 // 4-row steps whose loads are issued together
constexpr int kBatchRows = 4 * kSteps;    // packed rows per batch (mirrored in Python)
constexpr int kWideRows = 16;            // rows per block of the wide instance (9..64 rows in chunks of 16)
constexpr int kMaxRows = 64;             // rows per launch
constexpr int kNarrowMaxM = 8;           // rows per MMA group (the B operand's 8 columns)
constexpr int kMinBlocksPerSm = 4;       // caps registers at 128 (no spills) so 16 warps fit on an SM
constexpr int kHeavyMinBlocksPerSm = 3;  // 168 registers: the wide instance (a second row group), the rolling one

struct Params {
  const uint32_t* qweight;
  const uint16_t* x;
  const uint16_t* scales;
  const uint16_t* zeros;  // nullptr when symmetric
  const uint16_t* bias;   // nullptr without bias
  uint16_t* out;
  float* partials;
  unsigned* counters;
  int64_t x_stride;  // elements between activation rows
  int n;
  int m;              // activation rows (the wide instance reads it; the others are compiled for theirs)
  int chunks;         // row chunks of kWideRows (wide instance; 1 otherwise): blockIdx.x = tile * chunks + chunk
  int rows;           // K / 8
  int group_shift;    // row -> group: row >> group_shift (31 when one group spans K)
  int fold_mask;      // steps per fold window - 1
  int chunk_batches;  // batches per split
  int splits;
  int prefetch;       // batches ahead whose weights each warp asks L2 for (0: none; register kernel)
  int early_weights;  // one-row kernel: copy the first batch's weights before the PDL wait
  int early_dependents;  // let the next kernel launch at the start, not after the k loop (one-wave grids)
  // One-row kernel: every batch is full and holds one fold window, and the group rows advance by a
  // constant per batch of a warp (groups of the batch's rows up to a block's, or one group), so the
  // copies need no bounds and the scale rows run on by a constant.
  int uniform;
  // Deferred RMSNorm (one-row kernel instances of kNormProduce / kNormConsume only). Producer:
  // h = T(T(out) + residual) goes to norm_residual_out, out = T(norm_weight * h), and each column
  // tile's sum of h^2 to norm_sumsq_out[tile].
  const uint16_t* norm_residual;
  uint16_t* norm_residual_out;
  const uint16_t* norm_weight;
  float* norm_sumsq_out;
  // Consumer: every output is scaled by rsqrt(sum(norm_sumsq[0..norm_tiles)) * norm_inv_k +
  // norm_eps) before the bias.
  const float* norm_sumsq;
  int norm_tiles;
  float norm_inv_k;
  float norm_eps;
};
// Which side of a deferred RMSNorm a launch is: compile-time, so plain launches carry none of it.
constexpr int kNormNone = 0;
constexpr int kNormProduce = 1;
constexpr int kNormConsume = 2;
constexpr int kNormLoadsPerLane = 4;  // a consumer reads at most 32 x 4 producer tiles (N <= 8192)

// Opaque copies: the compiler keeps these in registers instead of re-deriving base + (column +
// offset) * size with 64-bit adds at every load (each address is then one IMAD.WIDE), or of
// re-materialising a constant once per use.
template <typename P>
__device__ __forceinline__ const P* pinned(const P* ptr) {
  const P* out;
  asm("mov.b64 %0, %1;" : "=l"(out) : "l"(ptr));
  return out;
}
__device__ __forceinline__ uint32_t pinned_u32(uint32_t v) {
  uint32_t out;
  asm("mov.b32 %0, %1;" : "=r"(out) : "r"(v));
  return out;
}

// Ask L2 for a line without waiting for it or holding a register: the warp's later batches are
// fetched from HBM while it waits on and computes the current one.
__device__ __forceinline__ void prefetch_l2(const void* ptr) { asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr)); }

// The sum of every thread's v, stored to *dst by thread 0 in a fixed order (deterministic). Every
// thread of the block calls it.
template <int kBlockThreads>
__device__ __forceinline__ void block_sum_store(float v, float* dst) {
  __shared__ float warp_sums[kBlockThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kBlockThreads / 32; ++w) total += warp_sums[w];
    *dst = total;
  }
}

// The block's outputs from its column sums: value(m, nl) is the sum for activation row m and tile
// column nl (0..kTileN). Plain: output n = tile * kTileN + nl, rounded once after the bias. Gated:
// the tile's first 32 columns are gate columns j, the next 32 the matching up columns N/2 + j; g
// and u are rounded to T after their bias, as the plain kernel would store them, then combined as
// the SiLU-and-mul kernel combines them (silu_mul_rounded).
//
// kNormConsume: `scale` multiplies every sum before its bias. kNormProduce (plain, one row): the
// output is the pre-norm block's next input instead, h = T(T(v) + residual) as the fused add +
// RMSNorm kernel rounds it, out = T(norm_weight * h), plus the tile's sum of h^2 (see Params);
// `norm_row` holds this thread's (residual, norm weight), loaded by the kernel long before.
template <typename T, bool kGated, int kBlockThreads = kThreads, int kNorm = kNormNone, int kTile = kTileN,
          typename Value>
__device__ __forceinline__ void write_outputs(const Params& p, int tile, int row0, int m_rows, float scale,
                                              float2 norm_row, Value value) {
  static_assert(!(kGated && kNorm == kNormProduce), "a gated launch cannot produce a deferred RMSNorm");
  static_assert(kNorm != kNormProduce || kBlockThreads >= kTile, "a producer's thread owns one output");
  using Tr = Traits<T>;
  constexpr int kCols = kGated ? kTile / 2 : kTile;
  const int n_out = kGated ? p.n / 2 : p.n;
  float sumsq = 0.f;
  for (int idx = threadIdx.x; idx < m_rows * kCols; idx += kBlockThreads) {
    const int m = idx / kCols;
    const int j = idx % kCols;
    const int n = tile * kCols + j;
    if (n >= n_out) continue;
    float v = value(m, j);
    if constexpr (kNorm == kNormConsume) v *= scale;
    if (p.bias != nullptr) v += Tr::to_float(p.bias[n]);
    if constexpr (kGated) {
      float up = value(m, j + kCols);
      if constexpr (kNorm == kNormConsume) up *= scale;
      if (p.bias != nullptr) up += Tr::to_float(p.bias[n_out + n]);
      v = silu_mul_rounded<T>(round_to_dtype<T>(v), round_to_dtype<T>(up));
    } else if constexpr (kNorm == kNormProduce) {
      const float h = round_to_dtype<T>(round_to_dtype<T>(v) + norm_row.x);
      p.norm_residual_out[n] = Tr::from_float(h);
      v = norm_row.y * h;  // exact in fp32 (two 16-bit factors), rounded once below
      sumsq = fmaf(h, h, sumsq);
    }
    p.out[static_cast<int64_t>(row0 + m) * n_out + n] = Tr::from_float(v);
  }
  if constexpr (kNorm == kNormProduce) block_sum_store<kBlockThreads>(sumsq, p.norm_sumsq_out + tile);
}

// One 4-row step's products: lane (g, t) holds the words of columns 4g..4g+3 of packed row t for
// each of kSub subtiles (w) and activation row 8q + g's 8 activations of that row (x). `first`
// starts a fold window (the sums start from zero). Shared by the register kernel and the one-row
// kernel (whose narrow tiles have one subtile).
template <typename T, int kGroups, bool kXsum, int kSub>
__device__ __forceinline__ void step_products(const uint4 (&w)[kSub], const uint4 (&x)[kGroups], bool first,
                                              uint32_t magic, uint32_t ones, float (&part)[kGroups][kSub][2][4],
                                              float (&xsum)[kGroups][4]) {
  using Tr = Traits<T>;
  const float kZero[4] = {0.f, 0.f, 0.f, 0.f};
  // B operand: this lane's 8 activations x[8q + g][8j..8j+7] reordered to the (i, i + 4) pairing.
  uint32_t bq[kGroups][4];
#pragma unroll
  for (int q = 0; q < kGroups; ++q) {
    bq[q][0] = __byte_perm(x[q].x, x[q].z, 0x5410);  // k + 0, k + 4
    bq[q][1] = __byte_perm(x[q].x, x[q].z, 0x7632);  // k + 1, k + 5
    bq[q][2] = __byte_perm(x[q].y, x[q].w, 0x5410);  // k + 2, k + 6
    bq[q][3] = __byte_perm(x[q].y, x[q].w, 0x7632);  // k + 3, k + 7
  }
#pragma unroll
  for (int u = 0; u < kSub; ++u) {
    uint32_t pr[4][4];  // [word c = column 4g + c][pair i = nibbles (i, i + 4)]
#pragma unroll
    for (int c = 0; c < 4; ++c) Tr::unpack(word(w[u], c), magic, pr[c]);
    // A rows g / g + 8 are columns 4g + 2h / 4g + 2h + 1; A columns 2t, 2t + 1, 2t + 8, 2t + 9
    // are nibbles (0, 4, 1, 5) of row t in the first MMA and (2, 6, 3, 7) in the second.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int q = 0; q < kGroups; ++q) {
        Tr::mma(part[q][u][h], first ? kZero : part[q][u][h], pr[2 * h][0], pr[2 * h + 1][0], pr[2 * h][1],
                pr[2 * h + 1][1], bq[q][0], bq[q][1]);
        Tr::mma(part[q][u][h], part[q][u][h], pr[2 * h][2], pr[2 * h + 1][2], pr[2 * h][3], pr[2 * h + 1][3],
                bq[q][2], bq[q][3]);
      }
    }
  }
  if constexpr (kXsum) {
#pragma unroll
    for (int q = 0; q < kGroups; ++q) {
      Tr::mma(xsum[q], first ? kZero : xsum[q], ones, ones, ones, ones, bq[q][0], bq[q][1]);
      Tr::mma(xsum[q], xsum[q], ones, ones, ones, ones, bq[q][2], bq[q][3]);
    }
  }
}

// The end of a fold window (all of it inside one group): acc += scale * (part - offset * xsum),
// offset = the unpack's bias (+ the zero point). `reset` zeroes the window's sums when the next
// window starts inside the same batch (G < 32 x steps per batch). kEvenRowsOnly: one activation
// row, so the accumulators of the odd MMA columns (rows 2t + 1) are never written.
template <typename T, int kGroups, bool kHasZero, bool kXsum, bool kEvenRowsOnly = false, int kSub = kSubtiles>
__device__ __forceinline__ void fold_window(const uint2 (&scale)[kSub], const uint2 (&zero)[kSub], bool reset,
                                            float (&part)[kGroups][kSub][2][4], float (&xsum)[kGroups][4],
                                            float (&acc)[kGroups][kSub][2][4]) {
#pragma unroll
  for (int u = 0; u < kSub; ++u) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        if (kEvenRowsOnly && (r & 1)) continue;
        const int c = 2 * h + (r >> 1);
        const float s = meta_at<T>(scale[u], c);
        float offset = Traits<T>::kBias;  // sum (a - bias - zero) x = sum a x - (bias + zero) sum x
        if constexpr (kHasZero) offset += meta_at<T>(zero[u], c);
#pragma unroll
        for (int q = 0; q < kGroups; ++q) {
          float v = part[q][u][h][r];
          if constexpr (kXsum) v = fmaf(-offset, xsum[q][r & 1], v);
          acc[q][u][h][r] = fmaf(s, v, acc[q][u][h][r]);
          if (reset) part[q][u][h][r] = 0.f;
        }
      }
    }
  }
  if (kXsum && reset) {
#pragma unroll
    for (int q = 0; q < kGroups; ++q) {
#pragma unroll
      for (int r = 0; r < 4; ++r) xsum[q][r] = 0.f;
    }
  }
}

// The block's end: sum its warps' accumulators through shared memory, then write the outputs
// (one split) or publish this split's partials, the last block of the tile adding them in split
// order (deterministic) and resetting the tile's counter for the next launch.
// kNormConsume: *shared_scale (written before this function's first barrier) scales the outputs;
// kNormProduce: norm_row is write_outputs'. kSub: 32-column subtiles per tile (the one-row kernel's
// narrow tiles have one).
template <typename T, int M, bool kGated, int kGroups, int kBlockWarps = kWarps, int kNorm = kNormNone,
          int kSub = kSubtiles>
__device__ __forceinline__ void reduce_and_write(const Params& p, const float (&acc)[kGroups][kSub][2][4],
                                                 int slot, int tile, int split, int row0, int m_rows,
                                                 const float* shared_scale = nullptr, float2 norm_row = {}) {
  constexpr int kTile = 32 * kSub;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  constexpr int kBlockThreads = 32 * kBlockWarps;
  // Rows padded by 4 floats, so the t-strided float2 stores spread over the banks; float2 stores
  // need 8-byte alignment.
  __shared__ __align__(16) float red[kBlockWarps][M][kTile + 4];
  __shared__ bool last_block;
#pragma unroll
  for (int q = 0; q < kGroups; ++q) {
    const int row = 8 * q + 2 * t;
#pragma unroll
    for (int u = 0; u < kSub; ++u) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int nl = 32 * u + 4 * g + 2 * h;
        if (row < m_rows) {
          *reinterpret_cast<float2*>(&red[warp][row][nl]) = make_float2(acc[q][u][h][0], acc[q][u][h][2]);
        }
        if (row + 1 < m_rows) {
          *reinterpret_cast<float2*>(&red[warp][row + 1][nl]) = make_float2(acc[q][u][h][1], acc[q][u][h][3]);
        }
      }
    }
  }
  __syncthreads();

  auto block_sum = [&](int m, int nl) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kBlockWarps; ++w) v += red[w][m][nl];
    return v;
  };
  float scale = 1.f;
  if constexpr (kNorm == kNormConsume) scale = *shared_scale;
  if (p.splits == 1) {
    write_outputs<T, kGated, kBlockThreads, kNorm, kTile>(p, tile, row0, m_rows, scale, norm_row, block_sum);
    return;
  }
  float* tile_partials = p.partials + static_cast<int64_t>(slot) * p.splits * M * kTile;
  for (int idx = threadIdx.x; idx < m_rows * kTile; idx += kBlockThreads) {
    tile_partials[split * M * kTile + idx] = block_sum(idx / kTile, idx % kTile);
  }

  // Publish the partials (each thread fences its own stores), then count this block in.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(p.counters + slot, 1u) == static_cast<unsigned>(p.splits - 1);
  __syncthreads();
  if (!last_block) return;
  __threadfence();  // order the reads below after the other blocks' published stores
  // .cg loads go to L2, where the other SMs' stores are; in split order, so results are deterministic.
  write_outputs<T, kGated, kBlockThreads, kNorm, kTile>(p, tile, row0, m_rows, scale, norm_row, [&](int m, int nl) {
    float v = 0.f;
#pragma unroll 4
    for (int s = 0; s < p.splits; ++s) v += __ldcg(tile_partials + s * M * kTile + m * kTile + nl);
    return v;
  });
  if (threadIdx.x == 0) p.counters[slot] = 0u;  // every other block of the tile has counted: reset for the next launch
}

// Rolling loads (see load_step) for the narrow gated instance: the gate/up layer is the one long
// enough per warp (8 batches at Qwen3-8B's K) for the overlap to pay, and it has ~3 blocks per SM
// anyway (384 tiles), so the ~150 registers the rolling needs cost it no occupancy. Measured on an
// H200 (run T43, processes alternating): Qwen3-8B W4A16 bs1 graph 2.246 / 2.254 ms against 2.377 /
// 2.391. Rolling every instance spills at 128 registers and was slower (T42: 2.453 / 2.455).
template <int M, bool kGated>
constexpr bool kRollingLoads = kGated && M <= kNarrowMaxM;
// Blocks per SM the register cap allows for a launch of m rows: the wide instance and the rolling
// (gated narrow) one take the larger cap (mirrored by the Python wrapper's blocks_per_sm_for; the
// host also reads it to tell a one-wave grid).
constexpr int register_blocks_per_sm(int m, bool gated) {
  return (m > kNarrowMaxM || gated) ? kHeavyMinBlocksPerSm : kMinBlocksPerSm;
}
template <int M, bool kGated>
constexpr int kBlocksPerSm = register_blocks_per_sm(M, kGated);
static_assert(kBlocksPerSm<1, true> == kHeavyMinBlocksPerSm && kRollingLoads<1, true>,
              "the rolling instance takes the larger register cap");

template <typename T, int M, bool kHasZero, bool kGated>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<M, kGated>) w4a16_gemv_kernel(const Params p) {
  using Tr = Traits<T>;
  constexpr bool kRoll = kRollingLoads<M, kGated>;
  constexpr int kGroups = (M + kNarrowMaxM - 1) / kNarrowMaxM;  // MMA groups of 8 activation rows
  // The wide instance's block covers rows [row0, row0 + m_rows) of its chunk; `slot` numbers the
  // (tile, chunk) pairs for the split-K workspace.
  const int slot = blockIdx.x;
  const int chunk = M > kNarrowMaxM ? slot % p.chunks : 0;
  const int row0 = kWideRows * chunk;
  const int m_rows = M > kNarrowMaxM ? min(kWideRows, p.m - row0) : M;
  // sum(x) per window feeds the zero points and bf16's 136 offset.
  constexpr bool kXsum = kHasZero || Tr::kBias != 0.f;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;  // MMA group: weight columns 4g..4g+3 of a subtile; activation row g
  const int t = lane & 3;   // packed row within a step
  const int tile = M > kNarrowMaxM ? slot / p.chunks : slot;
  const int split = blockIdx.y;
  const int tile_n0 = tile * kTileN;  // (plain tiles; a gated tile is columns 32 * tile of each half)
  // Under PDL (pdl.cuh) the block waits before anything else: loading weights ahead of the wait
  // measured slower (the step's graph 2.77-2.86 ms against 2.47 plain, an earlier version of this
  // kernel), waiting first faster (T21: 2.389-2.392 ms against 2.445-2.451). A grid that fits in
  // one wave lets the next kernel launch here already (early_dependents, set by the host).
  if (p.early_dependents) pdl_launch_dependents();
  pdl_wait();

  // Loads never need masks on the common path: a column past N (last tile, N % 64 != 0) is
  // clamped onto column N - 4 and its junk sums are never written; activation rows past the last
  // repeat it and only feed MMA columns that are never written. Rows past K/8 (tail batch) are
  // clamped too, and there the activations are zeroed, which zeroes their products.
  const uint32_t* wcol[kSubtiles];
  const uint16_t* scol[kSubtiles];
  uint32_t col[kSubtiles];  // zero points: 32-bit offsets from the kernel argument (fewer registers)
#pragma unroll
  for (int u = 0; u < kSubtiles; ++u) {
    if constexpr (kGated) {  // subtile 0: gate columns, subtile 1: the matching up columns
      static_assert(kSubtiles == 2, "a gated tile pairs a gate subtile with an up subtile");
      col[u] = u * (p.n / 2) + min(32 * tile + 4 * g, p.n / 2 - 4);
    } else {
      col[u] = min(tile_n0 + 32 * u + 4 * g, p.n - 4);
    }
    wcol[u] = pinned(p.qweight + col[u]);
    scol[u] = pinned(p.scales + col[u]);
  }
  const uint16_t* x_row[kGroups];
#pragma unroll
  for (int q = 0; q < kGroups; ++q) x_row[q] = pinned(p.x + (row0 + min(8 * q + g, m_rows - 1)) * p.x_stride);
  const uint32_t magic = pinned_u32(Tr::kMagic);  // a register operand of the 3-input LOP3
  const uint32_t ones = pinned_u32(Tr::kOnes);     // one register for all four A operands of sum(x)

  // acc[q][u][h][r]: MMA accumulator layout, columns 4g + 2h (r = 0, 1) and 4g + 2h + 1 (r = 2, 3),
  // activation rows 8q + 2t (r even) and 8q + 2t + 1 (r odd).
  float acc[kGroups][kSubtiles][2][4] = {};
  float part[kGroups][kSubtiles][2][4];  // the current fold window's sums, before scaling
  float xsum[kGroups][4];                // the window's activation sums, rows 2t and 2t + 1 (kXsum only)
  uint2 cur_scale[kSubtiles];
  uint2 cur_zero[kSubtiles];

  const int total_batches = (p.rows + kBatchRows - 1) / kBatchRows;
  const int batch_end = min((split + 1) * p.chunk_batches, total_batches);
  auto prefetch_batch = [&](int b) {
    if (b >= batch_end) return;
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const uint32_t w_off = static_cast<uint32_t>(min(b * kBatchRows + 4 * s + t, p.rows - 1)) * p.n;
#pragma unroll
      for (int u = 0; u < kSubtiles; ++u) prefetch_l2(wcol[u] + w_off);
    }
  };
  const int first_batch = split * p.chunk_batches + warp;
  for (int d = 1; d < p.prefetch; ++d) prefetch_batch(first_batch + d * kWarps);

  uint4 wv[kSteps][kSubtiles];
  uint4 xv[kGroups][kSteps];
  uint2 sv[kSteps][kSubtiles];
  uint2 zv[kSteps][kSubtiles];
  // Loads of step s of batch b into the step's registers. Plain: every load of a batch is issued
  // before any is used, so each lane has kSteps * kSubtiles 16-byte weight loads (plus activations
  // and scales) in flight. Rolling (kRoll): the first batch is loaded up front, then each step,
  // once computed, loads the same step of the warp's next batch, so the next batch's loads are in
  // flight while the rest of this one computes.
  auto load_step = [&](int b, int s) {
    // Offsets are 32-bit (the host checks K/8 * N < 2^31): one IMAD.WIDE per address.
    const int step_row = b * kBatchRows + 4 * s;  // warp-uniform
    const uint32_t w_off = static_cast<uint32_t>(min(step_row + t, p.rows - 1)) * p.n;
#pragma unroll
    for (int u = 0; u < kSubtiles; ++u) wv[s][u] = load_streaming(wcol[u] + w_off);
#pragma unroll
    for (int q = 0; q < kGroups; ++q) {
      xv[q][s] = make_uint4(0, 0, 0, 0);
      if (step_row + t < p.rows) {
        xv[q][s] = __ldg(reinterpret_cast<const uint4*>(x_row[q] + 8 * static_cast<uint32_t>(step_row + t)));
      }
    }
    if ((s & p.fold_mask) == 0) {  // first step of a fold window: its group's scales
      const uint32_t meta = static_cast<uint32_t>(min(step_row, p.rows - 1) >> p.group_shift) * p.n;
#pragma unroll
      for (int u = 0; u < kSubtiles; ++u) {
        sv[s][u] = __ldg(reinterpret_cast<const uint2*>(scol[u] + meta));
        if constexpr (kHasZero) zv[s][u] = __ldg(reinterpret_cast<const uint2*>(p.zeros + (meta + col[u])));
      }
    }
  };
  if (kRoll && first_batch < batch_end) {
#pragma unroll
    for (int s = 0; s < kSteps; ++s) load_step(first_batch, s);
  }

  for (int b = first_batch; b < batch_end; b += kWarps) {
    if (p.prefetch > 0) prefetch_batch(b + p.prefetch * kWarps);
    const int next = b + kWarps;
    const bool more = next < batch_end;  // warp-uniform
    if constexpr (!kRoll) {
#pragma unroll
      for (int s = 0; s < kSteps; ++s) load_step(b, s);
    }

#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      if ((s & p.fold_mask) == 0) {
#pragma unroll
        for (int u = 0; u < kSubtiles; ++u) {
          cur_scale[u] = sv[s][u];
          if constexpr (kHasZero) cur_zero[u] = zv[s][u];
        }
      }
      uint4 xs[kGroups];
#pragma unroll
      for (int q = 0; q < kGroups; ++q) xs[q] = xv[q][s];
      // A batch starts a fold window, so its first step starts from zero.
      step_products<T, kGroups, kXsum>(wv[s], xs, s == 0, magic, ones, part, xsum);
      if (((s + 1) & p.fold_mask) == 0) {  // last step of a fold window: all of it in one group
        fold_window<T, kGroups, kHasZero, kXsum, M == 1>(cur_scale, cur_zero, s + 1 < kSteps, part, xsum, acc);
      }
      if (kRoll && more) load_step(next, s);  // this step's registers are free again
    }
  }

  // Otherwise the next kernel may launch while the blocks reduce (it waits for this grid before
  // reading): signalled here, not at the start, where blocks of the next kernel resident early
  // would take the slots of this grid's blocks that have not started yet.
  if (!p.early_dependents) pdl_launch_dependents();
  reduce_and_write<T, M, kGated, kGroups>(p, acc, slot, tile, split, row0, m_rows);
}

}  // namespace w4a16_gemv_detail
}  // namespace mllm_kernel
