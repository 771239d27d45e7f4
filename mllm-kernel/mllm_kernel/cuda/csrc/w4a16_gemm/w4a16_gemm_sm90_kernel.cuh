// w4a16_gemm's Hopper kernel (sm_90a): the same product in the same runtime layout as
// w4a16_gemm_kernel.cuh (qweight [K/8, N] int32, scales / zeros [K/G, N]), on warpgroup MMAs.
//
// Why: the mma.sync kernel keeps its activation fragments in registers, so every warp loads each
// activation row of the tile from shared memory once per 32 weight columns, and issues one small
// MMA per 16 x 8 x 16 piece; at 64 rows Nsight showed it issue-bound at half of the tensor rate.
// A wgmma multiplies a warpgroup's 64 weight columns by every row of the tile (up to 256) in one
// instruction, reading the activations from shared memory itself, and runs asynchronously while
// the warps dequantize the next weights.
//
// Roles: a block is 2 warpgroups (128 weight columns, 64 each); the weights' 4-bit words and the
// step's scale rows arrive by cp.async, 4 stages deep. Each thread dequantizes, per 64 k, two
// words of each of its two columns straight into the wgmma A fragment (registers), exactly as
// the mma.sync kernel rounds them; the activations are the B operand, read by descriptor.
//
// The k order: a lane holds the 8 nibbles of one word (8 consecutive k) of a column per 32 k, so
// its A slots (2t, 2t + 1) and (2t + 8, 2t + 9) of the two k16 steps hold the word's four
// adjacent pairs. In a 32-k window, the pair j of word t (k = 8t + 2j, + 1) therefore sits at
// slot pair 4j + t: the activations are stored in shared memory with the same transposition of
// their 4 x 4 pairs (4-byte units) per 32 k, through registers, in the 128-byte-swizzled K-major
// layout wgmma reads. Rows past M are zeros (no read); columns past N repeat N - 4's words.
//
// Pipeline per 64-k stage (all 256 threads copy; the barrier orders the ring):
//   wait for the stage's cp.async, barrier;
//   cp.async the weights of stage + 3 (its slot's readers finished before the barrier);
//   store the activations of stage + 2 from registers (slot of stage - 2: its wgmmas were waited
//   for before the barrier), fence them for the async proxy, load the next stage's into registers;
//   dequantize this stage's A fragments, issue its 4 wgmmas, wait until at most this group runs.
// Split K, the epilogue and the counters are the mma.sync kernel's.
#pragma once

#include "w4a16_gemm/w4a16_gemm_kernel.cuh"
#include "wgmma.cuh"

namespace mllm_kernel {
namespace w4a16_gemm_sm90_detail {

using w4a16_gemm_detail::dequantize_adjacent;
using w4a16_gemm_detail::Params;
using w4a16_gemv_detail::copy_async_16_cg;
using w4a16_gemv_detail::copy_async_commit;
using w4a16_gemv_detail::copy_async_wait;
using w4a16_gemv_detail::shared_address;
using w4a16_gemv_detail::shared_load_8;

constexpr int kWarpGroups = 2;
constexpr int kThreads = 128 * kWarpGroups;
constexpr int kTileN = 64 * kWarpGroups;  // weight columns per block
constexpr int kTileK = 64;
constexpr int kStages = 4;
constexpr int kWeightBytes = kTileK / 8 * kTileN * 4;  // 4 KiB
constexpr int kMetaRowBytes = kTileN * 2;
// A stage: the activation tile (1024-byte aligned for the swizzle), the weight tile, then 2 scale
// rows and 2 zero-point rows (one per 32 k). Every stage size is a multiple of 1024.
constexpr int x_bytes(int tile_m) { return tile_m * kTileK * 2; }
constexpr int stage_bytes(int tile_m) { return x_bytes(tile_m) + kWeightBytes + 4 * kMetaRowBytes; }
// + 1024: the dynamic window is aligned up to 1024 bytes inside the kernel.
constexpr int smem_bytes(int tile_m) { return kStages * stage_bytes(tile_m) + 1024; }
static_assert(stage_bytes(64) % 1024 == 0, "stages must keep the activation tiles 1024-byte aligned");
// The kernel derives each stage's descriptor by adding to the ring's, which stays exact while every
// shared address (the 1 KiB the system reserves, the alignment slack, the ring) is below 256 KiB.
static_assert(1024 + smem_bytes(256) <= (1 << 18), "descriptor address fields would carry");

template <int kTileM>
struct Wgmma;

#define MLLM_W4A16_WGMMA_SHAPE(N)                                                                          \
  template <>                                                                                              \
  struct Wgmma<N> {                                                                                        \
    template <typename T>                                                                                  \
    static __device__ __forceinline__ void run(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc) { \
      if constexpr (std::is_same_v<T, __half>) {                                                           \
        asm volatile(MLLM_W4A16_WGMMA_N##N("f16")                                                          \
                     : MLLM_W4A16_WGMMA_N##N##_OUTS                                                        \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));                     \
      } else {                                                                                             \
        asm volatile(MLLM_W4A16_WGMMA_N##N("bf16")                                                         \
                     : MLLM_W4A16_WGMMA_N##N##_OUTS                                                        \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));                     \
      }                                                                                                    \
    }                                                                                                      \
  };
MLLM_W4A16_WGMMA_SHAPE(64)
MLLM_W4A16_WGMMA_SHAPE(128)
MLLM_W4A16_WGMMA_SHAPE(256)
#undef MLLM_W4A16_WGMMA_SHAPE

// 64-row tiles leave room for two blocks per SM; 128 and 256 rows hold 64 / 128 accumulators.
constexpr int blocks_per_sm(int tile_m) { return tile_m <= 64 ? 2 : 1; }

template <typename T, int kTileM, bool kHasZero>
__global__ void __launch_bounds__(kThreads, blocks_per_sm(kTileM)) w4a16_gemm_sm90_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kStageBytes = stage_bytes(kTileM);
  constexpr int kXBytes = x_bytes(kTileM);
  constexpr int kAcc = kTileM / 2;
  extern __shared__ __align__(16) uint8_t smem[];
  // Pinned: left to itself the compiler re-derives the aligned base from the CTA's shared window
  // (S2UR and five uniform ops) at each of its three uses per stage.
  const uint32_t ring = w4a16_gemv_detail::pinned_u32((shared_address(smem) + 1023u) & ~1023u);
  // The stage's activation descriptor is the ring's plus the stage offset in 16-byte units (the
  // address field holds address / 16 in its low 14 bits and the ring ends below 256 KiB, so the
  // add never carries out of it); a k16 step adds 2 (32 bytes).
  const uint64_t ring_desc = wgmma::k_major_sw128_descriptor(ring);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int row_tile = blockIdx.x % p.row_tiles;
  const int col_tile = blockIdx.x / p.row_tiles;
  const int split = blockIdx.y;
  const int row0 = row_tile * kTileM;
  const int n0 = col_tile * kTileN;
  const int k_begin = split * p.k_chunk;
  const int iters = p.k_chunk / kTileK;

  // This thread's two weight columns (the A rows g and g + 8 of its warp): adjacent, so their
  // words, scales and outputs are 8-, 4- and 4-byte pairs.
  const int col = 64 * (tid >> 7) + 16 * ((tid >> 5) & 3) + 2 * g;

  // Weight copy: thread u takes packed row u / 32, 16-byte unit u % 32 (4 columns); unit j of
  // packed row r lives at j ^ 4 (r % 2), so the 4 packed rows a warp reads at once (t = 0..3)
  // fall in two bank halves (an 8-byte warp read needs two wavefronts at best).
  const int wr = tid >> 5;
  const int wj = tid & 31;
  const uint32_t* w_src = p.qweight + static_cast<int64_t>(wr) * p.n + min(n0 + 4 * wj, p.n - 4);
  // Pinned, as the copy pointers below: at 120+ registers ptxas otherwise re-derives these at every stage.
  const uint32_t w_dst = w4a16_gemv_detail::pinned_u32(kXBytes + (wr * 32 + (wj ^ (4 * (wr & 1)))) * 16);
  uint32_t w_read[2];  // this lane's 8 bytes of packed row 4h + t
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = 4 * h + t;
    w_read[h] = kXBytes + (r * 32 + ((col >> 2) ^ (4 * (r & 1)))) * 16 + (col & 3) * 4;
  }
  // Scale / zero-point rows, as the mma.sync kernel copies them (MetaRowCopy), after the weights.
  const uint32_t meta_read = kXBytes + kWeightBytes + col * 2;

  // Activation copy: unit u = tid + 256 i is row u / 8, 16-byte unit c = u % 8 (k 8c .. 8c + 7,
  // i.e. word t' = c % 4 of window c / 4); its pair j goes to the window's slot pair 4j + t',
  // which is unit 4 (c / 4) + j, bytes 4t', swizzled by the row.
  constexpr int kXUnits = kTileM * 8 / kThreads;
  static_assert(kTileM * 8 % kThreads == 0, "the activation tile must fill the copy roles");
  const uint16_t* x_src[kXUnits];  // advanced by 64 k per load
  bool x_valid[kXUnits];
#pragma unroll
  for (int i = 0; i < kXUnits; ++i) {
    const int r = (tid + kThreads * i) >> 3;
    x_valid[i] = row0 + r < p.m;
    x_src[i] = p.x + static_cast<int64_t>(min(row0 + r, p.m - 1)) * p.x_stride + k_begin + 8 * (tid & 7);
  }
  // Every unit of this thread has c = tid % 8 and row % 8 = (tid / 8) % 8, its units kThreads / 8
  // rows (4 KiB) apart: pair j of unit i goes to x_store[j] + 4096 i. Pinned in registers, so
  // that the swizzle is not re-derived at every stage.
  uint32_t x_store[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int unit = (4 * ((tid & 7) >> 2) + j) ^ ((tid >> 3) & 7);
    x_store[j] = w4a16_gemv_detail::pinned_u32((tid >> 3) * 128 + unit * 16 + (tid & 3) * 4);
  }
  static_assert(kThreads / 8 * 128 == 4096, "units of a thread are 4 KiB apart");
  uint4 x_regs[kXUnits];
  // The weights' and the scale rows' next stage (64 k: 8 packed rows), advanced per load.
  const uint32_t* w_next = w_src + static_cast<int64_t>(k_begin / 8) * p.n;
  const int64_t w_step = static_cast<int64_t>(8) * p.n;
  w4a16_gemm_detail::MetaRowCopy<kHasZero> meta_rows(p, tid, n0, k_begin, kXBytes + kWeightBytes);

  pdl_wait();

  auto load_weights = [&](int stage) {
    const uint32_t base = ring + stage * kStageBytes;
    copy_async_16_cg(base + w_dst, w_next, true);
    w_next += w_step;
    meta_rows.copy_next(base, p.group_shift);
  };
  auto load_x = [&]() {
#pragma unroll
    for (int i = 0; i < kXUnits; ++i) {
      x_regs[i] = x_valid[i] ? *reinterpret_cast<const uint4*>(x_src[i]) : make_uint4(0, 0, 0, 0);
      x_src[i] += kTileK;
    }
  };
  auto store_x = [&](int stage) {
    const uint32_t base = ring + stage * kStageBytes;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t addr = base + x_store[j];
#pragma unroll
      for (int i = 0; i < kXUnits; ++i) {
        // 4096 i: an immediate offset of the store (ptxas folds the constant add).
        asm volatile("st.shared.u32 [%0], %1;" ::"r"(addr + 4096 * i), "r"(w4a16_gemv_detail::word(x_regs[i], j))
                     : "memory");
      }
    }
    wgmma::fence_proxy_async();
  };

  // a[s]: the A fragment of k16 step s: {column col, slot pair t}, {col + 1, t}, {col, t + 4},
  // {col + 1, t + 4}; step s = 2h + e takes pairs 2e and 2e + 1 of window h's words.
  auto dequantize = [&](uint32_t base, uint32_t (&a)[4][4]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint2 words = shared_load_8(base + w_read[h]);
      uint32_t scales;
      asm volatile("ld.shared.u32 %0, [%1];" : "=r"(scales) : "r"(base + meta_read + h * kMetaRowBytes) : "memory");
      uint32_t zeros = 0;
      if constexpr (kHasZero) {
        asm volatile("ld.shared.u32 %0, [%1];" : "=r"(zeros) : "r"(base + meta_read + (2 + h) * kMetaRowBytes) : "memory");
      }
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        uint32_t pairs[4];
        dequantize_adjacent<T, kHasZero>(e ? words.y : words.x, scales, zeros, e != 0, pairs);
#pragma unroll
        for (int j = 0; j < 4; ++j) a[2 * h + (j >> 1)][2 * (j & 1) + e] = pairs[j];
      }
    }
  };

  float acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;
  wgmma::fence_operands(acc);

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < iters) load_weights(st);
    copy_async_commit();
  }
#pragma unroll
  for (int st = 0; st < kStages - 2; ++st) {
    if (st < iters) {
      load_x();
      store_x(st);
    }
  }
  if (kStages - 2 < iters) load_x();

  uint32_t a[4][4];
  // Stage `it` in ring slot `slot` (it % kStages).
  auto run_stage = [&](int it, int slot) {
    copy_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < iters) load_weights((slot + kStages - 1) % kStages);
    copy_async_commit();
    const int next_x = it + kStages - 2;
    if (next_x < iters) {
      store_x((slot + kStages - 2) % kStages);
      if (next_x + 1 < iters) load_x();
    }
    dequantize(ring + slot * kStageBytes, a);
    wgmma::fence();
    const uint64_t desc = ring_desc + static_cast<uint32_t>(slot * (kStageBytes / 16));
#pragma unroll
    for (int s = 0; s < 4; ++s) Wgmma<kTileM>::template run<T>(acc, a[s], desc + 2 * s);
    wgmma::commit();
    wgmma::wait<1>();
  };
  // In whole rounds of kStages (Qwen3's layers under the plans: K / 64 per split a multiple of 4)
  // each slot is a compile-time constant, so its shared addresses and descriptor fold into
  // immediates (166 -> 137 SASS instructions per stage at 64-row tiles). Other counts take the
  // plain loop. A stage dequantizes into `a` while the previous stage's wgmmas may still read it;
  // ptxas keeps the two in different registers (or serializes, warning C7513, checked by
  // test_cuda_compile), but `#pragma unroll 4` on the plain loop left a remainder loop that
  // computed wrong sums (T231), so that form is not used.
  if (iters % kStages == 0) {
    for (int round = 0; round < iters; round += kStages) {
#pragma unroll
      for (int slot = 0; slot < kStages; ++slot) run_stage(round + slot, slot);
    }
  } else {
#pragma unroll 2
    for (int it = 0; it < iters; ++it) run_stage(it, it % kStages);
  }
  wgmma::wait<0>();
  wgmma::fence_operands(acc);
  copy_async_wait<0>();
  pdl_launch_dependents();

  // acc[4j + q]: column col + (q >> 1), row 8j + 2t + (q & 1) of the tile.
  w4a16_gemm_detail::finish_tile<T, kTileM, kTileN>(p, row0, n0, split, [&](auto&& fn) {
#pragma unroll
    for (int j = 0; j < kTileM / 8; ++j) {
#pragma unroll
      for (int odd = 0; odd < 2; ++odd) fn(8 * j + 2 * t + odd, col, acc[4 * j + odd], acc[4 * j + 2 + odd]);
    }
  });
#endif
}

}  // namespace w4a16_gemm_sm90_detail
}  // namespace mllm_kernel
