// store_cache: scatter the K/V rows of new tokens into the paged KV cache,
// k_cache[loc[i]] = k[i] and v_cache[loc[i]] = v[i].
#pragma once

#include "common.cuh"

namespace mllm_kernel {
namespace store_cache_detail {

constexpr int kBlockThreads = 256;

struct Rows {
  const char* k;
  const char* v;
  char* k_cache;
  char* v_cache;
  // Byte strides between consecutive tokens / slots; rows themselves are dense.
  int64_t k_stride;
  int64_t v_stride;
  int64_t k_cache_stride;
  int64_t v_cache_stride;
};

// A group of `threads_per_token` threads (a multiple of a warp) copies one
// token's K and V rows with kBytes-wide accesses.
template <int kBytes, typename IndexT>
__global__ void __launch_bounds__(kBlockThreads)
    store_cache_kernel(Rows rows, const IndexT* __restrict__ loc, int64_t num_tokens, int64_t vecs_per_row,
                       int threads_per_token) {
  using Vec = typename VecOf<kBytes>::type;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * (kBlockThreads / threads_per_token) +
                        threadIdx.x / threads_per_token;
  if (token >= num_tokens) return;
  const int lane = threadIdx.x % threads_per_token;
  const int64_t slot = static_cast<int64_t>(loc[token]);

  const Vec* __restrict__ k_src = reinterpret_cast<const Vec*>(rows.k + token * rows.k_stride);
  const Vec* __restrict__ v_src = reinterpret_cast<const Vec*>(rows.v + token * rows.v_stride);
  Vec* __restrict__ k_dst = reinterpret_cast<Vec*>(rows.k_cache + slot * rows.k_cache_stride);
  Vec* __restrict__ v_dst = reinterpret_cast<Vec*>(rows.v_cache + slot * rows.v_cache_stride);

  // Both loads are issued before the stores so each lane keeps two
  // independent requests in flight.
#pragma unroll 4
  for (int64_t i = lane; i < vecs_per_row; i += threads_per_token) {
    const Vec kx = k_src[i];
    const Vec vx = v_src[i];
    k_dst[i] = kx;
    v_dst[i] = vx;
  }
}

template <int kBytes, typename IndexT>
void launch(const Rows& rows, const IndexT* loc, int64_t num_tokens, int64_t row_bytes, cudaStream_t stream) {
  const int64_t vecs_per_row = row_bytes / kBytes;
  // Widen the group for long rows so no thread copies more than ~4 vectors
  // per tensor; short rows still get a full warp to keep accesses coalesced.
  int threads_per_token = 32;
  while (threads_per_token < kBlockThreads && vecs_per_row > 4 * threads_per_token) threads_per_token *= 2;
  const int64_t tokens_per_block = kBlockThreads / threads_per_token;
  const int64_t blocks = ceil_div(num_tokens, tokens_per_block);
  store_cache_kernel<kBytes, IndexT>
      <<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(rows, loc, num_tokens, vecs_per_row,
                                                                   threads_per_token);
  check_launch();
}

// The Python wrapper reports user-facing errors; these checks guard the
// address arithmetic below against direct callers.
inline void check_rows(const TensorView& t, const char* name, int64_t elem_bytes) {
  TVM_FFI_CHECK(t.ndim() == 3, ValueError) << name << " must be 3-D, got " << t.ndim() << "-D";
  TVM_FFI_CHECK(t.dtype().bits == elem_bytes * 8, TypeError) << name << " has the wrong dtype";
  TVM_FFI_CHECK((t.size(2) <= 1 || t.stride(2) == 1) && (t.size(1) <= 1 || t.stride(1) == t.size(2)), ValueError)
      << name << " must be dense in its last two dims";
}

}  // namespace store_cache_detail

template <typename T, typename IndexT>
void store_cache(TensorView k, TensorView v, TensorView k_cache, TensorView v_cache, TensorView out_cache_loc) {
  using namespace store_cache_detail;
  constexpr int64_t elem = sizeof(T);
  check_rows(k, "k", elem);
  check_rows(v, "v", elem);
  check_rows(k_cache, "k_cache", elem);
  check_rows(v_cache, "v_cache", elem);
  TVM_FFI_CHECK(out_cache_loc.ndim() == 1 && out_cache_loc.dtype().bits == sizeof(IndexT) * 8 &&
                    (out_cache_loc.size(0) <= 1 || out_cache_loc.stride(0) == 1),
                ValueError)
      << "out_cache_loc must be a contiguous 1-D tensor of " << sizeof(IndexT) * 8 << "-bit indices";
  const int64_t num_tokens = out_cache_loc.size(0);
  const int64_t row_bytes = k.size(1) * k.size(2) * elem;
  TVM_FFI_CHECK(k.size(0) == num_tokens && v.size(0) == num_tokens, ValueError)
      << "k, v and out_cache_loc disagree on the number of tokens";
  TVM_FFI_CHECK(v.size(1) * v.size(2) * elem == row_bytes && k_cache.size(1) * k_cache.size(2) * elem == row_bytes &&
                    v_cache.size(1) * v_cache.size(2) * elem == row_bytes,
                ValueError)
      << "k, v, k_cache and v_cache must have the same row size";
  if (num_tokens == 0 || row_bytes == 0) return;

  const Rows rows{byte_ptr(k),
                  byte_ptr(v),
                  byte_ptr(k_cache),
                  byte_ptr(v_cache),
                  k.stride(0) * elem,
                  v.stride(0) * elem,
                  k_cache.stride(0) * elem,
                  v_cache.stride(0) * elem};
  const auto* loc = reinterpret_cast<const IndexT*>(byte_ptr(out_cache_loc));

  tvm::ffi::CUDADeviceGuard guard(k.device().device_id);
  const cudaStream_t stream = current_stream(k);
  const int access = widest_access({reinterpret_cast<uint64_t>(rows.k), reinterpret_cast<uint64_t>(rows.v),
                                    reinterpret_cast<uint64_t>(rows.k_cache), reinterpret_cast<uint64_t>(rows.v_cache),
                                    static_cast<uint64_t>(rows.k_stride), static_cast<uint64_t>(rows.v_stride),
                                    static_cast<uint64_t>(rows.k_cache_stride),
                                    static_cast<uint64_t>(rows.v_cache_stride), static_cast<uint64_t>(row_bytes)});
  switch (access) {
    case 16:
      return launch<16>(rows, loc, num_tokens, row_bytes, stream);
    case 8:
      return launch<8>(rows, loc, num_tokens, row_bytes, stream);
    case 4:
      return launch<4>(rows, loc, num_tokens, row_bytes, stream);
    case 2:
      return launch<2>(rows, loc, num_tokens, row_bytes, stream);
    default:
      return launch<1>(rows, loc, num_tokens, row_bytes, stream);
  }
}

}  // namespace mllm_kernel
