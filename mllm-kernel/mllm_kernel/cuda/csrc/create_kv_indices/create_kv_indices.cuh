// create_kv_indices: gather the KV-cache slots of each request of a batch
// into FlashInfer's flat kv_indices (page size 1):
//   kv_indices[kv_indptr[i] + j] = req_to_token[req_pool_indices[i], start_i + j]
// for j < page_kernel_lens[i], where start_i = kv_start_idx[i] or 0.
// Launches read every size from device memory, so the call never syncs with
// the host and can be captured in a CUDA graph.
#pragma once

#include "common.cuh"

namespace mllm_kernel {
namespace create_kv_indices_detail {

// Large CTAs with a deep unroll keep enough loads in flight for a single
// long request (bs=1, 32k tokens: 7.7 us on H200 vs 19 us with 256 threads
// and unroll 4) and cost nothing measurable on short ones.
constexpr int kBlockThreads = 1024;

// One CTA per request; consecutive threads copy consecutive tokens, so both
// the read of the req_to_token row and the write of kv_indices coalesce.
template <typename PoolIndexT, typename StartT>
__global__ void __launch_bounds__(kBlockThreads)
    create_kv_indices_kernel(const int32_t* __restrict__ req_to_token, int64_t req_to_token_stride,
                             const PoolIndexT* __restrict__ req_pool_indices,
                             const int32_t* __restrict__ page_kernel_lens, const int32_t* __restrict__ kv_indptr,
                             const StartT* __restrict__ kv_start_idx, int32_t* __restrict__ kv_indices) {
  const int64_t req = blockIdx.x;
  const int64_t start = kv_start_idx == nullptr ? 0 : static_cast<int64_t>(kv_start_idx[req]);
  const int32_t* __restrict__ src =
      req_to_token + static_cast<int64_t>(req_pool_indices[req]) * req_to_token_stride + start;
  int32_t* __restrict__ dst = kv_indices + kv_indptr[req];
  const int32_t len = page_kernel_lens[req];
#pragma unroll 8
  for (int32_t j = threadIdx.x; j < len; j += kBlockThreads) dst[j] = src[j];
}

inline void check_vector(const TensorView& t, const char* name, int bits) {
  TVM_FFI_CHECK(t.ndim() == 1 && t.dtype().bits == bits && (t.size(0) <= 1 || t.stride(0) == 1), ValueError)
      << name << " must be a contiguous 1-D tensor of " << bits << "-bit integers";
}

}  // namespace create_kv_indices_detail

template <typename PoolIndexT, typename StartT>
void create_kv_indices(TensorView req_to_token, TensorView req_pool_indices, TensorView page_kernel_lens,
                       TensorView kv_indptr, Optional<TensorView> kv_start_idx, TensorView kv_indices) {
  using namespace create_kv_indices_detail;
  // The Python wrapper reports user-facing errors; these checks guard the
  // address arithmetic below against direct callers.
  TVM_FFI_CHECK(req_to_token.ndim() == 2 && req_to_token.dtype().bits == 32 &&
                    (req_to_token.size(1) <= 1 || req_to_token.stride(1) == 1),
                ValueError)
      << "req_to_token must be a 2-D int32 tensor with dense rows";
  check_vector(req_pool_indices, "req_pool_indices", sizeof(PoolIndexT) * 8);
  check_vector(page_kernel_lens, "page_kernel_lens", 32);
  check_vector(kv_indptr, "kv_indptr", 32);
  check_vector(kv_indices, "kv_indices", 32);
  const int64_t batch_size = req_pool_indices.size(0);
  TVM_FFI_CHECK(page_kernel_lens.size(0) == batch_size && kv_indptr.size(0) == batch_size + 1, ValueError)
      << "page_kernel_lens must have batch_size and kv_indptr batch_size + 1 entries";
  const StartT* start = nullptr;
  if (kv_start_idx.has_value()) {
    check_vector(kv_start_idx.value(), "kv_start_idx", sizeof(StartT) * 8);
    TVM_FFI_CHECK(kv_start_idx.value().size(0) == batch_size, ValueError)
        << "kv_start_idx must have batch_size entries";
    start = reinterpret_cast<const StartT*>(byte_ptr(kv_start_idx.value()));
  }
  if (batch_size == 0) return;

  tvm::ffi::CUDADeviceGuard guard(req_to_token.device().device_id);
  create_kv_indices_kernel<PoolIndexT, StartT>
      <<<static_cast<unsigned>(batch_size), kBlockThreads, 0, current_stream(req_to_token)>>>(
          reinterpret_cast<const int32_t*>(byte_ptr(req_to_token)), req_to_token.stride(0),
          reinterpret_cast<const PoolIndexT*>(byte_ptr(req_pool_indices)),
          reinterpret_cast<const int32_t*>(byte_ptr(page_kernel_lens)),
          reinterpret_cast<const int32_t*>(byte_ptr(kv_indptr)), start,
          reinterpret_cast<int32_t*>(byte_ptr(kv_indices)));
  check_launch();
}

}  // namespace mllm_kernel
