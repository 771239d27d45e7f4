// Hopper warpgroup MMA (wgmma, sm_90a) for kernels whose A operand comes from registers: the
// fences and group waits, the shared-memory descriptor of a K-major operand in the 128-byte
// swizzle, and the instruction strings of the shapes used (m64 x n x k16, fp32 accumulators).
//
// The rules the callers follow (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply"):
// wgmma_fence() before the first wgmma of a batch whose A registers or accumulators were written
// by ordinary instructions; shared memory written by ordinary stores reaches wgmma only after the
// writer's fence_proxy_async() and a barrier; the accumulators are read only after a wait that
// covers every wgmma writing them (fence_operands() keeps the compiler from moving those reads).
#pragma once

#include <cstdint>

namespace mllm_kernel {
namespace wgmma {

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

template <int kCount>
__device__ __forceinline__ void fence_operands(float (&d)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Descriptor of a K-major tile in the 128-byte swizzle: rows of 64 16-bit k (128 bytes), each
// 16-byte unit c of row r stored at unit c ^ (r % 8), 8-row atoms 1024 bytes apart (the stride
// byte offset); the tile must start 1024-byte aligned. A k16 step inside the 64 k of a row starts
// 32 bytes further (the hardware applies the XOR to the final address bits, so the step's offset
// composes with the swizzle). The leading byte offset is unused in this mode.
__device__ __forceinline__ uint64_t k_major_sw128_descriptor(uint32_t smem_address) {
  constexpr uint64_t kFixed = (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
  return kFixed | ((smem_address & 0x3FFFFu) >> 4);
}

}  // namespace wgmma
}  // namespace mllm_kernel

// The wgmma shapes the kernel uses: m64 (weight columns) x n = rows of the tile x k16, A (the
// dequantized weights) from registers, B (the activations) by descriptor, fp32 accumulators. Operands
// in order: the n / 2 accumulators, the 4 A registers, the descriptor, then the scale-d predicate's
// source (1: accumulate); each shape's operand lists extend the smaller shape's.
#define MLLM_W4A16_WGMMA_ASM(SHAPE, TYPE, ACC, A, DESC, SCALE_D)                                  \
  "{ .reg .pred p; setp.ne.b32 p, " SCALE_D ", 0; wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE \
  "." TYPE " {" ACC "}, {" A "}, " DESC ", p, 1, 1, 0; }"
#define MLLM_W4A16_WGMMA_ACC_0_31 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define MLLM_W4A16_WGMMA_ACC_32_63 \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, " \
  "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define MLLM_W4A16_WGMMA_ACC_64_127 \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, " \
  "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, " \
  "%100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, " \
  "%115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define MLLM_W4A16_WGMMA_N64(TYPE) \
  MLLM_W4A16_WGMMA_ASM("m64n64k16", TYPE, MLLM_W4A16_WGMMA_ACC_0_31, "%32, %33, %34, %35", "%36", "%37")
#define MLLM_W4A16_WGMMA_N128(TYPE)                                                                   \
  MLLM_W4A16_WGMMA_ASM("m64n128k16", TYPE, MLLM_W4A16_WGMMA_ACC_0_31 ", " MLLM_W4A16_WGMMA_ACC_32_63, \
                       "%64, %65, %66, %67", "%68", "%69")
#define MLLM_W4A16_WGMMA_N256(TYPE)                                                                 \
  MLLM_W4A16_WGMMA_ASM("m64n256k16", TYPE,                                                          \
                       MLLM_W4A16_WGMMA_ACC_0_31 ", " MLLM_W4A16_WGMMA_ACC_32_63 ", " MLLM_W4A16_WGMMA_ACC_64_127, \
                       "%128, %129, %130, %131", "%132", "%133")

// The accumulators d[o .. o + 31] as read-write asm operands.
#define MLLM_W4A16_WGMMA_D8(o)                                                                        \
  "+f"(d[(o)]), "+f"(d[(o) + 1]), "+f"(d[(o) + 2]), "+f"(d[(o) + 3]), "+f"(d[(o) + 4]), "+f"(d[(o) + 5]), \
      "+f"(d[(o) + 6]), "+f"(d[(o) + 7])
#define MLLM_W4A16_WGMMA_D32(o) \
  MLLM_W4A16_WGMMA_D8(o), MLLM_W4A16_WGMMA_D8((o) + 8), MLLM_W4A16_WGMMA_D8((o) + 16), MLLM_W4A16_WGMMA_D8((o) + 24)
#define MLLM_W4A16_WGMMA_N64_OUTS MLLM_W4A16_WGMMA_D32(0)
#define MLLM_W4A16_WGMMA_N128_OUTS MLLM_W4A16_WGMMA_N64_OUTS, MLLM_W4A16_WGMMA_D32(32)
#define MLLM_W4A16_WGMMA_N256_OUTS MLLM_W4A16_WGMMA_N128_OUTS, MLLM_W4A16_WGMMA_D32(64), MLLM_W4A16_WGMMA_D32(96)
