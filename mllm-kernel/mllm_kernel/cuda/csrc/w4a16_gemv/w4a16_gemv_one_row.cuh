// w4a16_gemv's one-row kernel (M = 1, a decode step at batch 1): the arithmetic, column tiles,
// split K and epilogue of w4a16_gemv_kernel.cuh, with the weights streamed through shared memory
// by cp.async instead of loaded into registers.
//
// Why: the register kernel holds a batch's loads in registers until they arrive, so a warp either
// waits for its loads or computes, and its 128 registers per thread allow 16 warps per SM. At one
// row it is bound by the cycles of that chain, not by HBM (Nsight Compute, runs T59 and T73: the
// same ~33k cycles per gate/up call at 1.33 GHz under the profiler as at 1.98 GHz in a graph).
// Here each warp streams its batches through kOneRowStages shared-memory stages: the copies of the next
// batch are in flight while the warp computes on the current one and cost no registers (80 to 90
// per thread), so blocks can have 8 or 16 warps, each on its own interleaved batches of K.
//
// The stages are private to the warp (no block barriers), and the copies are laid out for the
// memory system, not for the lane that reads them back: a warp's copy of a step reads 4 packed
// rows x 128 contiguous bytes, lane l taking row l / 8 and 16-byte chunk l % 8. (Copying each
// lane's own MMA operand words, lane (g, t) = row t chunk g, split every L2 sector into two
// requests: run T70, half the HBM rate.) Chunk (row r, c) lands in slot 8r + (c ^ 2r) of the
// step's 512 bytes, an XOR swizzle that keeps the copy's and the MMA lanes' 16-byte accesses free
// of bank conflicts; MMA lane (g, t) reads slot 8t + (g ^ 2t). Lanes read words other lanes
// copied, hence a __syncwarp after each cp.async.wait_group.
//
// Measured against the register kernel (run T74, H200, Qwen3-8B layers at one row, graphs over
// cold weights, best split each): qkv 6.3 against 8.4 us, o 5.6 against 6.3, gated gate/up 17.2
// against 18.2, down 10.3 against 11.7; the four chained 39.3 against 44.2 us. At 2..8 rows it was
// slower than the register kernel (T72-T74), so only one-row launches take it.
//
// Tiles are 64 columns (two 32-column subtiles per warp), or 32 (narrow: one subtile, a batch of 4
// steps instead of 2, so a warp still copies 2 KiB at a time). A layer of few column tiles (N = 4096
// on 132 SMs: 64 blocks) needs more blocks than tiles to reach the memory's rate; narrow tiles give
// it twice the blocks without the split-K round trip (partials, fence, counter, last block's sum).
#pragma once

#include "w4a16_gemv_kernel.cuh"

namespace mllm_kernel {
namespace w4a16_gemv_detail {

// Stages per warp: one batch computed, one in flight (T69-T74, T239: deeper rings were no faster).
// The kernel toggles between the two by XOR.
constexpr int kOneRowStages = 2;

// The stage of a tile of kSub 32-column subtiles: 64-column tiles (kSub 2) take 2 4-row steps per
// batch, narrow 32-column tiles (kSub 1, twice the blocks of a layer) 4, so a warp's batch is 2 KiB
// of weights either way. One warp's stage: weights [steps][kSub][32 swizzled slots] x 16 bytes,
// activations [steps][4 packed rows] x 16, then per step the scales and zero points of the group
// it starts (when it starts a fold window): [scale, zero][kSub][8 column quads] x 8.
template <int kSub>
struct OneRowStage {
  static_assert(kSub == 1 || kSub == 2, "tiles of one or two 32-column subtiles");
  static constexpr int kTile = 32 * kSub;             // columns per block
  static constexpr int kSteps = 4 / kSub;             // 4-row steps per batch
  static constexpr int kRows = 4 * kSteps;            // packed rows per batch (mirrored in Python)
  static constexpr int kMetaStepBytes = 2 * kSub * 64;
  static constexpr int kXOffset = kSteps * kSub * 32 * 16;
  static constexpr int kMetaOffset = kXOffset + kSteps * 4 * 16;
  static constexpr int kBytes = kMetaOffset + kSteps * kMetaStepBytes;
};
// Dynamic shared memory of a block of `warps` warps (the host's launch and opt-in).
template <int kSub>
constexpr int one_row_ring_bytes(int warps) { return warps * kOneRowStages * OneRowStage<kSub>::kBytes; }

__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
// cp.async of 16 bytes, zero-filled when !valid (rows past K/8): weights bypass L1 (.cg, read
// once), activations may stay in it (.ca, read by every block).
__device__ __forceinline__ void copy_async_16_cg(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void copy_async_16_ca(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void copy_async_8(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(dst), "l"(src), "r"(valid ? 8 : 0) : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}
// Shared-memory reads as volatile asm with a memory clobber: they must stay after the wait.
__device__ __forceinline__ uint4 shared_load_16(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr)
               : "memory");
  return v;
}
// A float from L2 (.cg: another kernel wrote it), as volatile asm so it is issued where it stands.
__device__ __forceinline__ float global_load_f32_cg(const float* ptr) {
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(ptr) : "memory");
  return v;
}
// A 16-bit element as float bits of T: .nc for weights (no kernel writes them), .cg for activations.
template <typename T, bool kWeight>
__device__ __forceinline__ float global_load_element(const uint16_t* ptr) {
  uint16_t v;
  if constexpr (kWeight) {
    asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(ptr) : "memory");
  } else {
    asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(v) : "l"(ptr) : "memory");
  }
  return Traits<T>::to_float(v);
}
__device__ __forceinline__ uint2 shared_load_8(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr) : "memory");
  return v;
}

// Column of quad c (columns 4c..4c+3 of the subtile) of subtile u in this tile, clamped as the
// register kernel clamps it. A gated tile's second half is the up columns matching its first
// half's gate columns: subtile 1 of a 64-column tile, quads 4..7 of a narrow one.
template <bool kGated, int kTile>
__device__ __forceinline__ uint32_t quad_column(const Params& p, int tile, int u, int c) {
  if constexpr (kGated) {
    const int half = kTile == 64 ? u : c >> 2;
    const int quad = kTile == 64 ? c : c & 3;
    return half * (p.n / 2) + min(kTile / 2 * tile + 4 * quad, p.n / 2 - 4);
  }
  return min(tile * kTile + 32 * u + 4 * c, p.n - 4);
}

// At most 80 registers per thread: 3 blocks of 8 warps (Qwen3-8B's gate/up grid in one wave) or
// 1 of 16 per SM (the host also reads this to tell a one-wave grid).
constexpr int one_row_blocks_per_sm(int block_warps) { return block_warps == 8 ? 3 : 1; }

// kNorm: a deferred RMSNorm's producer or consumer instance (kNormProduce / kNormConsume, see
// Params). kSub: 32-column subtiles per tile (OneRowStage).
template <typename T, bool kHasZero, bool kGated, int kBlockWarps, int kNorm, int kSub = kSubtiles>
__global__ void __launch_bounds__(32 * kBlockWarps, one_row_blocks_per_sm(kBlockWarps))
    w4a16_gemv_one_row_kernel(const Params p) {
  using Tr = Traits<T>;
  using Stage = OneRowStage<kSub>;
  constexpr int kTile = Stage::kTile;
  constexpr int kOneRowSteps = Stage::kSteps;
  constexpr int kOneRowRows = Stage::kRows;
  constexpr int kOneRowStageBytes = Stage::kBytes;
  constexpr bool kXsum = kHasZero || Tr::kBias != 0.f;
  extern __shared__ __align__(16) uint8_t ring[];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int tile = blockIdx.x;
  const int split = blockIdx.y;
  const int total_batches = (p.rows + kOneRowRows - 1) / kOneRowRows;
  const int batch_end = min((split + 1) * p.chunk_batches, total_batches);
  const int first_batch = split * p.chunk_batches + warp;
  const uint32_t ring_base = shared_address(ring) + warp * (kOneRowStages * kOneRowStageBytes);
  // One stage to the other: one LOP3 (a compare against the ring's end made ptxas re-derive the
  // shared window every batch).
  const uint32_t stage_toggle = pinned_u32(ring_base ^ (ring_base + kOneRowStageBytes));

  // Copy roles. Weights: row cr = lane / 8 of each step, quad cc = lane % 8 of each subtile, into
  // the swizzled slot. Scales (lanes 0..8 kSub - 1) and zero points (the next 8 kSub): subtile
  // (lane / 8) % kSub, quad lane % 8. Activations: lanes 0..3 copy the 16 bytes of packed row t of
  // each step.
  const int cr = lane >> 3;
  const int cc = lane & 7;
  // Opaque copies (pinned): left to itself the compiler re-derives these from the thread index and
  // the kernel arguments inside every batch's copy block (T77: 3 % fewer instructions with them).
  const uint32_t w_dst = pinned_u32((cr * 8 + (cc ^ (2 * cr))) * 16);
  const uint32_t x_dst = pinned_u32(Stage::kXOffset + t * 16);
  const uint32_t meta_dst = pinned_u32(Stage::kMetaOffset + lane * 8);
  const bool copies_meta = lane < (kHasZero ? 16 : 8) * kSub;
  const bool copies_x = g == 0;
  const int64_t n = p.n;
  const uint32_t* wsrc[kSub];
#pragma unroll
  for (int u = 0; u < kSub; ++u) {
    wsrc[u] = p.qweight + quad_column<kGated, kTile>(p, tile, u, cc) + (first_batch * kOneRowRows + cr) * n;
  }
  const uint16_t* msrc = pinned((lane < 8 * kSub || !kHasZero ? p.scales : p.zeros) +
                                quad_column<kGated, kTile>(p, tile, (lane >> 3) & (kSub - 1), cc));
  const uint16_t* xsrc = p.x + 8 * (first_batch * kOneRowRows + t);
  const int64_t w_advance = int64_t{kBlockWarps} * kOneRowRows * n;  // words from one of the warp's batches to its next
  constexpr int kXAdvance = kBlockWarps * kOneRowRows * 8;
  const int rows = pinned_u32(p.rows);
  const int group_shift = pinned_u32(p.group_shift);
  const int fold_mask = pinned_u32(p.fold_mask);

  // Uniform launches (the host's Params::uniform: every batch full, one fold window per batch, the
  // group rows advancing by a constant per batch of the warp) copy without bounds and run a
  // scale-row pointer instead of deriving each row; the others take the general form. SASS per
  // batch (sm_90): gated gate/up 308 -> 246, narrow producer 356 -> 226; the Qwen3-8B bs1 step
  // 0.4 % (H100, T241) and 0.9 % (H200, T242) faster: the loop is not issue-bound.
  // `meta_row`: the uniform form's scale row of the warp's next batch (set in its stream).
  const uint16_t* meta_row = nullptr;
  const int meta_advance = ((kBlockWarps * kOneRowRows) >> group_shift) * p.n;  // < 2^31: fewer words than qweight

  // Copies of the warp's next batch `b` into the stage at `dst`; the pointers then move on. The
  // weights and scales are no kernel's output, so they may be copied before the PDL wait.
  auto copy_weights = [&](int b, uint32_t dst, auto uniform) {
    constexpr bool kUniform = decltype(uniform)::value;
    if (b >= batch_end) return;
#pragma unroll
    for (int s = 0; s < kOneRowSteps; ++s) {
      const int row0 = b * kOneRowRows + 4 * s;  // the step's first packed row
#pragma unroll
      for (int u = 0; u < kSub; ++u) {
        copy_async_16_cg(dst + (s * kSub + u) * 512 + w_dst, wsrc[u] + 4 * s * n, kUniform || row0 + cr < rows);
      }
      if constexpr (kUniform) {
        if (s == 0 && copies_meta) copy_async_8(dst + meta_dst, meta_row, true);
      } else if ((s & fold_mask) == 0 && copies_meta) {
        copy_async_8(dst + s * Stage::kMetaStepBytes + meta_dst, msrc + (min(row0, rows - 1) >> group_shift) * n,
                     row0 < rows);
      }
    }
#pragma unroll
    for (int u = 0; u < kSub; ++u) wsrc[u] += w_advance;
    if constexpr (kUniform) meta_row += meta_advance;
  };
  auto copy_x = [&](int b, uint32_t dst, auto uniform) {
    constexpr bool kUniform = decltype(uniform)::value;
    if (b >= batch_end) return;
    if (copies_x) {
#pragma unroll
      for (int s = 0; s < kOneRowSteps; ++s) {
        copy_async_16_ca(dst + s * 64 + x_dst, xsrc + 32 * s, kUniform || b * kOneRowRows + 4 * s + t < rows);
      }
    }
    xsrc += kXAdvance;
  };

  const bool early_dependents = p.early_dependents != 0;
  float2 norm_row = {};
  float norm_parts[kNormLoadsPerLane] = {};
  float acc[1][kSub][2][4] = {};
  auto stream = [&](auto uniform) {
    constexpr bool kUniform = decltype(uniform)::value;
    if constexpr (kUniform) meta_row = msrc + ((first_batch * kOneRowRows) >> group_shift) * n;
    // The first kOneRowStages - 1 batches: their weights before the PDL wait when the host asks for
    // it, so HBM streams while the kernel before ends.
    const bool early = p.early_weights != 0;
    if (early) {
#pragma unroll
      for (int i = 0; i < kOneRowStages - 1; ++i) {
        copy_weights(first_batch + i * kBlockWarps, ring_base + i * kOneRowStageBytes, uniform);
      }
    }
    // Where the grid fits in one wave (the host checks; the plan's grids do), blocks of the next
    // kernel resident early take no slot one of this grid's blocks waits for, and they may start
    // their own weight copies sooner.
    if (early_dependents) pdl_launch_dependents();
    // Deferred RMSNorm (producer): the thread that may write output n of the tile loads its norm
    // weight now and its residual right after the wait, so the epilogue waits on neither (every
    // block loads them: which one ends its tile is known only then).
    const int norm_n = tile * kTile + threadIdx.x;
    const bool owns_output = kNorm == kNormProduce && threadIdx.x < kTile && norm_n < p.n;
    if (owns_output) norm_row.y = global_load_element<T, true>(p.norm_weight + norm_n);
    pdl_wait();
    if (owns_output) norm_row.x = global_load_element<T, false>(p.norm_residual + norm_n);
    // Deferred RMSNorm (consumer): warp 0 loads the producer's per-tile sums of squares now and adds
    // them after the k loop, so their latency hides behind the weight stream; the norm's 1 / rms then
    // scales the outputs (W (w * h) / rms(h) = W norm(h), see Params).
    if (kNorm == kNormConsume && warp == 0) {
#pragma unroll
      for (int i = 0; i < kNormLoadsPerLane; ++i) {
        const int idx = lane + 32 * i;
        if (idx < p.norm_tiles) norm_parts[i] = global_load_f32_cg(p.norm_sumsq + idx);
      }
    }
#pragma unroll
    for (int i = 0; i < kOneRowStages - 1; ++i) {
      if (!early) copy_weights(first_batch + i * kBlockWarps, ring_base + i * kOneRowStageBytes, uniform);
      copy_x(first_batch + i * kBlockWarps, ring_base + i * kOneRowStageBytes, uniform);
      copy_async_commit();
    }

    const uint32_t magic = pinned_u32(Tr::kMagic);
    const uint32_t ones = pinned_u32(Tr::kOnes);
    float part[1][kSub][2][4];
    float xsum[1][4];
    uint2 cur_scale[kSub];
    uint2 cur_zero[kSub];
    const uint32_t w_src_slot = (t * 8 + (g ^ (2 * t))) * 16;  // MMA lane (g, t): row t, quad g
    const uint32_t x_src_slot = Stage::kXOffset + t * 16;
    const uint32_t meta_src_slot = Stage::kMetaOffset + g * 8;

    uint32_t stage = ring_base;                         // the batch computed now
    uint32_t refill = ring_base + kOneRowStageBytes;     // the other stage, computed last
    for (int b = first_batch; b < batch_end; b += kBlockWarps) {
      copy_async_wait<kOneRowStages - 2>();  // this lane's copies of batch b have landed
      __syncwarp();                         // and every lane's; the reads of the refilled stage are done
      copy_weights(b + (kOneRowStages - 1) * kBlockWarps, refill, uniform);
      copy_x(b + (kOneRowStages - 1) * kBlockWarps, refill, uniform);
      copy_async_commit();

#pragma unroll
      for (int s = 0; s < kOneRowSteps; ++s) {
        if (kUniform ? s == 0 : (s & fold_mask) == 0) {
#pragma unroll
          for (int u = 0; u < kSub; ++u) {
            const uint32_t meta = stage + s * Stage::kMetaStepBytes + meta_src_slot + u * 64;
            cur_scale[u] = shared_load_8(meta);
            if constexpr (kHasZero) cur_zero[u] = shared_load_8(meta + kSub * 64);
          }
        }
        uint4 wv[kSub];
#pragma unroll
        for (int u = 0; u < kSub; ++u) wv[u] = shared_load_16(stage + (s * kSub + u) * 512 + w_src_slot);
        const uint4 xv[1] = {shared_load_16(stage + s * 64 + x_src_slot)};
        // Every lane's B column is activation row 0: MMA columns 1..7 repeat it and are never read.
        step_products<T, 1, kXsum>(wv, xv, s == 0, magic, ones, part, xsum);
        if (kUniform ? s + 1 == kOneRowSteps : ((s + 1) & fold_mask) == 0) {
          fold_window<T, 1, kHasZero, kXsum, true>(cur_scale, cur_zero, !kUniform && s + 1 < kOneRowSteps, part, xsum,
                                                   acc);
        }
      }
      refill = stage;
      stage ^= stage_toggle;
    }
  };
  if (p.uniform != 0) {
    stream(std::true_type{});
  } else {
    stream(std::false_type{});
  }
  copy_async_wait<0>();  // no copy may land in shared memory after the block exits

  if (!early_dependents) pdl_launch_dependents();
  __shared__ float norm_scale;
  if (kNorm == kNormConsume && warp == 0) {
    float sumsq = 0.f;
#pragma unroll
    for (int i = 0; i < kNormLoadsPerLane; ++i) sumsq += norm_parts[i];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) sumsq += __shfl_xor_sync(0xFFFFFFFFu, sumsq, offset);
    if (lane == 0) norm_scale = rsqrtf(fmaf(sumsq, p.norm_inv_k, p.norm_eps));
  }
  reduce_and_write<T, 1, kGated, 1, kBlockWarps, kNorm, kSub>(p, acc, tile, tile, split, 0, 1, &norm_scale, norm_row);
}

}  // namespace w4a16_gemv_detail
}  // namespace mllm_kernel
