// Programmatic dependent launch (PDL) for the decode kernels: the device-side signals and a
// launch helper that sets the attribute. Kept apart from common.cuh so that kernels which do not
// take part (and their cached builds) are unaffected.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include <tvm/ffi/extra/cuda/base.h>

namespace mllm_kernel {

// On SM90+ a kernel launched with `pdl` (see launch_kernel) may start while the kernel before it
// in the stream is still running, once every block of that kernel has called
// pdl_launch_dependents() (or exited). It must then call pdl_wait() before it touches anything
// an earlier kernel writes, and write nothing before it: the wait returns when the previous
// grid has completed and its memory is visible. What comes before the wait may only read data
// no kernel of the step writes (weights), which is the point: a decode GEMV's first weight loads
// overlap the tail of the kernel before it instead of starting after a full drain. Every
// kernel that calls these must reach pdl_wait() in all its threads that touch dependent data;
// kernels of ours that are launched with `pdl` call it on every path.
// On older GPUs (and without the launch attribute) both instructions are no-ops.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), with the programmatic-stream-serialization
// attribute when `pdl` is set (the caller decides: SM90+ only; mllm_kernel.pdl).
template <typename... KernelArgs, typename... Args>
void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                   Args&&... args) {
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = pdl ? 1 : 0;
  TVM_FFI_CHECK_CUDA_ERROR(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace mllm_kernel
