// w4a16_gemm: a tensor-core GEMM with 4-bit weights for batches past the GEMV's sweet spot
// (decode batches of tens to hundreds of rows, prefill chunks), in the same runtime layout as
// w4a16_gemv (qweight [K/8, N] int32, scales / zeros [K/G, N]; see w4a16_gemv_kernel.cuh):
//   out[m, n] = sum_k x[m, k] * w[k, n] (+ bias[n]),   w[k, n] = (q - 8 - zero) * scale.
//
// Why a second kernel: the GEMV multiplies each unpacked weight by 8 or 16 activation rows and
// re-reads the weights (from L2) for every further 16 rows, so past ~32 rows it is bound by its
// unpacking and its MMAs, not by HBM. Here a block holds a [BM x 64] activation tile and a
// [64 x 128] weight tile in shared memory (cp.async, kStages deep) and each warp multiplies its
// 32 unpacked weight columns by all BM rows: every weight is unpacked once per BM rows.
//
// The MMA's operands are laid out as in the GEMV: its 16 A rows are weight columns (4g + 2h,
// 4g + 2h + 1 for lane g), its 8 B columns activation rows. Its k order differs: lane t's k pairs
// are adjacent nibbles (2i, 2i + 1) of packed row t (unpack_adjacent), so the B operands are the
// activations' 16 bytes of that row as they lie in shared memory, with no permute (the GEMV pairs
// nibble i with i + 4, two instructions per word cheaper to unpack, and permutes the activations:
// here each unpacked weight meets up to 8 activation groups, so the permutes would cost more).
// Unlike the GEMV the weights are dequantized to 16 bits before the MMA ((q - 8 - zero) * scale
// rounded once, exactly as the dequantizer rounds them), so no per-window fp32 fold is needed and
// the only accumulators are the MMA's: 64 floats per lane at 64 rows.
//
// Shared-memory tiles are XOR-swizzled so that every quarter-warp's 16-byte reads hit 8 distinct
// bank groups: weight unit (row r, 16-byte column unit j) lives at r * 32 + (j ^ 2 (r % 4)),
// activation unit (row m, unit c) at m * 8 + (c ^ 4 (m % 2)).
//
// Split K: blocks of one (column tile, row tile) covering different K chunks write fp32 partials;
// the last to arrive (a per-slot counter) adds them in split order (deterministic), writes the
// output and resets the counter for the next launch (CUDA-graph replays), as w4a16_gemv does.
#pragma once

#include "common.cuh"
#include "pdl.cuh"
#include "w4a16_gemv/w4a16_gemv_kernel.cuh"
#include "w4a16_gemv/w4a16_gemv_one_row.cuh"

namespace mllm_kernel {
namespace w4a16_gemm_detail {

using w4a16_gemv_detail::copy_async_16_ca;
using w4a16_gemv_detail::copy_async_16_cg;
using w4a16_gemv_detail::copy_async_8;
using w4a16_gemv_detail::copy_async_commit;
using w4a16_gemv_detail::copy_async_wait;
using w4a16_gemv_detail::shared_address;
using w4a16_gemv_detail::shared_load_16;
using w4a16_gemv_detail::shared_load_8;
using w4a16_gemv_detail::Traits;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTileN = 32 * kWarps;   // weight columns per block: 32 per warp
constexpr int kTileK = 64;            // k per pipeline stage: 8 packed rows, two 32-k steps
constexpr int kPackedRows = kTileK / 8;
constexpr int kStages = 4;
constexpr int kWeightStageBytes = kPackedRows * kTileN * 4;  // 4 KiB

// A stage: the weight tile, the activation tile, then each 32-k step's row of scales (and of zero
// points), kTileN 16-bit values each.
constexpr int kMetaRowBytes = kTileN * 2;
constexpr int meta_offset(int tile_m) { return kWeightStageBytes + tile_m * kTileK * 2; }
constexpr int stage_bytes(int tile_m) { return meta_offset(tile_m) + 2 * 2 * kMetaRowBytes; }
constexpr int smem_bytes(int tile_m) { return kStages * stage_bytes(tile_m); }

struct Params {
  const uint32_t* qweight;
  const uint16_t* x;
  const uint16_t* scales;
  const uint16_t* zeros;  // nullptr when symmetric
  const uint16_t* bias;   // nullptr without bias
  uint16_t* out;
  float* partials;
  unsigned* counters;
  int64_t x_stride;
  int m;
  int n;
  int row_tiles;    // blockIdx.x = column tile * row_tiles + row tile (row tiles of a column run together)
  int k_chunk;      // k per split, a multiple of kTileK
  int splits;
  int group_shift;  // k -> group: k >> group_shift (31: one group spans K)
};

// fma.rn on two 16-bit lanes: a * b + c rounded once (exact when a * b + c is representable).
template <typename T>
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  if constexpr (std::is_same_v<T, __half>) {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  return d;
}

// Both halves set to the 16-bit value `bits`.
__device__ __forceinline__ uint32_t splat(uint32_t bits) { return (bits & 0xFFFFu) * 0x10001u; }

// The 16-bit pattern of `v` in T (exact for the small integers it is used with).
template <typename T>
__device__ __forceinline__ uint32_t bits_of(float v) {
  return Traits<T>::from_float(v);
}

// The nibble pairs (2i, 2i + 1) of w as 16-bit pairs magic + q (magic: 1024 for fp16, 128 for
// bf16, whose 7 or more mantissa bits take a nibble exactly): byte i of w goes to the low half and
// byte i of w >> 4 to the high half, then one LOP3 keeps a nibble in each and ORs in the magic.
// Pairing adjacent k keeps the activations' k order, so B operands need no permute.
__device__ __forceinline__ void unpack_adjacent(uint32_t w, uint32_t magic, uint32_t (&pairs)[4]) {
  const uint32_t hi = w >> 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t selector = i | (i << 4) | ((4 + i) << 8) | ((4 + i) << 12);
    pairs[i] = w4a16_gemv_detail::mask_or<0x000F000Fu>(__byte_perm(w, hi, selector), magic);
  }
}

// One word's 8 weights of a column as the pairs of unpack_adjacent, dequantized to T exactly as the
// dequantizer rounds them: magic + q less (magic + 8 + zero) is exact (an integer of at most 11
// bits), then one multiply by the scale rounds once. The column's 16-bit scale and zero point are
// half `upper` of scale_pair and zero_pair (zero_pair is ignored without zero points): one PRMT
// copies a half into both (a shift, mask and multiply otherwise).
template <typename T, bool kHasZero>
__device__ __forceinline__ void dequantize_adjacent(uint32_t w, uint32_t scale_pair, uint32_t zero_pair, bool upper,
                                                    uint32_t (&pairs)[4]) {
  using Tr = Traits<T>;
  const uint32_t half_selector = upper ? 0x3232u : 0x1010u;
  float offset = std::is_same_v<T, __half> ? 1032.f : 136.f;  // magic + 8
  if constexpr (kHasZero) offset += Tr::to_float(static_cast<uint16_t>(upper ? zero_pair >> 16 : zero_pair));
  const uint32_t offset2 = splat(bits_of<T>(-offset));
  const uint32_t scale2 = __byte_perm(scale_pair, 0u, half_selector);
  const uint32_t one2 = splat(bits_of<T>(1.f));
  const uint32_t neg_zero2 = splat(bits_of<T>(-0.f));
  unpack_adjacent(w, Tr::kMagic, pairs);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    pairs[i] = fma2<T>(pairs[i], one2, offset2);      // q - 8 - zero, exact
    pairs[i] = fma2<T>(pairs[i], scale2, neg_zero2);  // times the scale, rounded once
  }
}

// The scale / zero-point rows of a block's stages, as both GEMM kernels copy them: thread i < 64
// (128 with zero points) copies 8 bytes (4 of the tile's 128 columns) of 32-k step (i / 32) % 2's
// row, zero points for i >= 64, into meta row i / 32 = 2 * kind + step at `stage_offset` of the
// stage. Stages are copied in order, so the row's k runs on by kTileK per copy.
template <bool kHasZero>
struct MetaRowCopy {
  const uint16_t* src;
  uint32_t row_elements;
  uint32_t dst;
  int k;
  bool active;

  __device__ __forceinline__ MetaRowCopy(const Params& p, int tid, int n0, int k_begin, uint32_t stage_offset)
      : src(w4a16_gemv_detail::pinned((tid < 64 ? p.scales : p.zeros) + min(n0 + 4 * (tid & 31), p.n - 4))),
        row_elements(w4a16_gemv_detail::pinned_u32(p.n)),
        dst(stage_offset + tid * 8),
        k(k_begin + 32 * ((tid >> 5) & 1)),
        active(tid < (kHasZero ? 128 : 64)) {}

  // The next stage's row into the stage at `stage_base`. A 32-bit offset: scale rows hold at most a
  // quarter as many elements as qweight has words (group >= 32), and the host holds those below 2^31.
  __device__ __forceinline__ void copy_next(uint32_t stage_base, int group_shift) {
    if (active) copy_async_8(stage_base + dst, src + static_cast<uint32_t>(k >> group_shift) * row_elements, true);
    k += kTileK;
  }
};

// The epilogue of both GEMM kernels for a tile of kTileM rows x kTileCols columns: for_each_pair(fn)
// calls fn(row, local column, value at column, value at column + 1) for each pair of adjacent
// columns this thread holds. Without split K they are stored (+ bias); with it they go to the
// slot's fp32 partials, and the last block to arrive (a per-slot counter) adds the splits in split
// order (deterministic), stores, and resets the counter for the next launch (CUDA-graph replays).
template <typename T, int kTileM, int kTileCols, typename ForEachPair>
__device__ __forceinline__ void finish_tile(const Params& p, int row0, int n0, int split, ForEachPair&& for_each_pair) {
  using Tr = Traits<T>;
  auto store = [&](int row, int nl, float v0, float v1) {
    const int n = n0 + nl;
    if (row0 + row >= p.m || n >= p.n) return;  // n is even and N % 4 == 0: n + 1 < N too
    if (p.bias != nullptr) {
      v0 += Tr::to_float(p.bias[n]);
      v1 += Tr::to_float(p.bias[n + 1]);
    }
    const uint32_t packed = Tr::from_float(v0) | (static_cast<uint32_t>(Tr::from_float(v1)) << 16);
    *reinterpret_cast<uint32_t*>(p.out + static_cast<int64_t>(row0 + row) * p.n + n) = packed;
  };
  if (p.splits == 1) {
    for_each_pair(store);
    return;
  }

  constexpr int kSlotFloats = kTileM * kTileCols;
  const int slot = blockIdx.x;
  float* slot_partials = p.partials + static_cast<int64_t>(slot) * p.splits * kSlotFloats;
  for_each_pair([&](int row, int nl, float v0, float v1) {
    *reinterpret_cast<float2*>(slot_partials + split * kSlotFloats + row * kTileCols + nl) = make_float2(v0, v1);
  });
  __shared__ bool last_block;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(p.counters + slot, 1u) == static_cast<unsigned>(p.splits - 1);
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  for_each_pair([&](int row, int nl, float, float) {
    float v0 = 0.f;
    float v1 = 0.f;
    for (int sp = 0; sp < p.splits; ++sp) {  // split order: deterministic
      const float2 v = __ldcg(reinterpret_cast<const float2*>(slot_partials + sp * kSlotFloats + row * kTileCols + nl));
      v0 += v.x;
      v1 += v.y;
    }
    store(row, nl, v0, v1);
  });
  if (threadIdx.x == 0) p.counters[slot] = 0u;
}

template <typename T, int kGroups, bool kHasZero>
__global__ void __launch_bounds__(kThreads, kGroups >= 8 ? 3 : 4) w4a16_gemm_kernel(const Params p) {
  using Tr = Traits<T>;
  constexpr int kTileM = 8 * kGroups;
  constexpr int kStageBytes = stage_bytes(kTileM);
  extern __shared__ __align__(16) uint8_t smem[];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int row_tile = blockIdx.x % p.row_tiles;
  const int col_tile = blockIdx.x / p.row_tiles;
  const int split = blockIdx.y;
  const int row0 = row_tile * kTileM;
  const int n0 = col_tile * kTileN;
  const int k_begin = split * p.k_chunk;
  const int iters = p.k_chunk / kTileK;
  // Pinned, as the copy addresses below: left to itself ptxas re-derives them at every stage.
  const uint32_t smem_base = w4a16_gemv_detail::pinned_u32(shared_address(smem));

  // Copy roles: weight unit u = tid + 128 i (i = 0, 1) is packed row u / 32, column unit u % 32;
  // activation unit u = tid + 128 i is row u / 8, k unit u % 8. Columns past N repeat N - 4 (every
  // copy in bounds; their products are never stored); rows past M are zero-filled without a read:
  // as copies of row M - 1 (T194) every block's clamped rows hit the same L2 lines and a partial
  // row tile ran at half speed. Activations go through L1 (.ca): the column tiles resident on an
  // SM read the same ones.
  // The copies of a stage go out in stage order, so each source is a running pointer. Unit i = 1
  // is packed row r + 4: 4 rows further in both, the same swizzle (2048 bytes further in the stage).
  const uint32_t* w_next[2];
  const int w_row = threadIdx.x / 32;
  const int w_unit = threadIdx.x % 32;
  w_next[0] = p.qweight + static_cast<int64_t>(k_begin / 8 + w_row) * p.n + min(n0 + 4 * w_unit, p.n - 4);
  w_next[1] = w_next[0] + static_cast<int64_t>(4) * p.n;
  const uint32_t w_dst = w4a16_gemv_detail::pinned_u32((w_row * 32 + (w_unit ^ (2 * (w_row & 3)))) * 16);
  constexpr uint32_t kWeightUnitStride = 4 * 32 * 16;
  const int64_t w_step = static_cast<int64_t>(kPackedRows) * p.n;
  constexpr int kXCopies = kTileM * 8 / kThreads;  // 16-byte units per thread (>= 1 for kTileM >= 16)
  static_assert(kTileM * 8 % kThreads == 0, "activation tile rows must fill the copy roles");
  const uint16_t* x_next[kXCopies];
  uint32_t x_dst[kXCopies];
  bool x_row_valid[kXCopies];
#pragma unroll
  for (int i = 0; i < kXCopies; ++i) {
    const int u = threadIdx.x + kThreads * i;
    const int r = u / 8;
    const int c = u % 8;
    x_row_valid[i] = row0 + r < p.m;
    x_next[i] = p.x + static_cast<int64_t>(min(row0 + r, p.m - 1)) * p.x_stride + k_begin + 8 * c;
    x_dst[i] = w4a16_gemv_detail::pinned_u32(kWeightStageBytes + (r * 8 + (c ^ (4 * (r & 1)))) * 16);
  }

  MetaRowCopy<kHasZero> meta_rows(p, threadIdx.x, n0, k_begin, meta_offset(kTileM));

  pdl_wait();

  // The next stage's copies, into ring slot `slot`.
  auto load_stage = [&](int slot) {
    const uint32_t base = smem_base + slot * kStageBytes;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      copy_async_16_cg(base + w_dst + i * kWeightUnitStride, w_next[i], true);
      w_next[i] += w_step;
    }
#pragma unroll
    for (int i = 0; i < kXCopies; ++i) {
      copy_async_16_ca(base + x_dst[i], x_next[i], x_row_valid[i]);
      x_next[i] += kTileK;
    }
    meta_rows.copy_next(base, p.group_shift);
  };

  float acc[kGroups][2][4] = {};

  auto compute_stage = [&](int slot) {
    const uint32_t base = smem_base + slot * kStageBytes;
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int r = 4 * s + t;  // packed row of the stage
      const uint4 wv = shared_load_16(base + (r * 32 + ((8 * warp + g) ^ (2 * t))) * 16);
      // This lane's 4 columns of the step's meta rows (scales: row s, zero points: row 2 + s).
      const uint32_t meta = base + meta_offset(kTileM) + s * kMetaRowBytes + (32 * warp + 4 * g) * 2;
      const uint2 sv = shared_load_8(meta);
      uint2 zv = make_uint2(0, 0);
      if constexpr (kHasZero) zv = shared_load_8(meta + 2 * kMetaRowBytes);
      // a[c][i]: column 4g + c, nibbles (2i, 2i + 1) of packed row r, dequantized to T.
      uint32_t a[4][4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        dequantize_adjacent<T, kHasZero>(w4a16_gemv_detail::word(wv, c), c < 2 ? sv.x : sv.y, c < 2 ? zv.x : zv.y,
                                         (c & 1) != 0, a[c]);
      }
#pragma unroll
      for (int q = 0; q < kGroups; ++q) {
        const int m = 8 * q + g;
        // x[m][8r' .. 8r' + 7] of this lane's packed row: the B operands as they lie in memory
        // (k pairs (0, 1), (2, 3) for the first MMA, (4, 5), (6, 7) for the second).
        const uint4 xv = shared_load_16(base + kWeightStageBytes + (m * 8 + ((4 * s + t) ^ (4 * (m & 1)))) * 16);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          Tr::mma(acc[q][h], acc[q][h], a[2 * h][0], a[2 * h + 1][0], a[2 * h][1], a[2 * h + 1][1], xv.x, xv.y);
          Tr::mma(acc[q][h], acc[q][h], a[2 * h][2], a[2 * h + 1][2], a[2 * h][3], a[2 * h + 1][3], xv.z, xv.w);
        }
      }
    }
  };

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < iters) load_stage(st);
    copy_async_commit();
  }
  // In rounds of kStages, so that each ring slot is a compile-time constant (its shared addresses
  // fold into immediates); the last round leaves early. (mma.sync reads its registers at issue, so
  // unlike the warpgroup kernel nothing here is in flight across the exit.)
  for (int round = 0; round < iters; round += kStages) {
#pragma unroll
    for (int slot = 0; slot < kStages; ++slot) {
      const int it = round + slot;
      if (it >= iters) break;
      copy_async_wait<kStages - 2>();
      __syncthreads();  // stage it is complete for every thread, and stage it - 1 is free to refill
      if (it + kStages - 1 < iters) load_stage((slot + kStages - 1) % kStages);
      copy_async_commit();
      compute_stage(slot);
    }
  }
  copy_async_wait<0>();
  pdl_launch_dependents();

  // acc[q][h][r]: activation row 8q + 2t + (r & 1), column 4g + 2h + (r >> 1) of the warp's 32.
  const int n_local = 32 * warp + 4 * g;
  finish_tile<T, kTileM, kTileN>(p, row0, n0, split, [&](auto&& fn) {
#pragma unroll
    for (int q = 0; q < kGroups; ++q) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int odd = 0; odd < 2; ++odd) fn(8 * q + 2 * t + odd, n_local + 2 * h, acc[q][h][odd], acc[q][h][2 + odd]);
      }
    }
  });
}

}  // namespace w4a16_gemm_detail
}  // namespace mllm_kernel
