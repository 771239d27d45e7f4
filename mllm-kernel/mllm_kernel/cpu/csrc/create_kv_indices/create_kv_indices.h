// create_kv_indices (CPU): FlashInfer's flat kv_indices for page size 1,
//   kv_indices[kv_indptr[i] + j] = req_to_token[req_pool_indices[i], start_i + j]
// for j < page_kernel_lens[i], where start_i = kv_start_idx[i] or 0.
#pragma once

#include <cstring>

#include "common.h"

namespace mllm_kernel {
namespace create_kv_indices_detail {

template <typename T>
T* vector_data(const TensorView& t, const char* name, int64_t size) {
  TVM_FFI_CHECK(t.ndim() == 1 && t.dtype().bits == sizeof(T) * 8 && (t.size(0) <= 1 || t.stride(0) == 1),
                ValueError)
      << name << " must be a contiguous 1-D tensor of " << sizeof(T) * 8 << "-bit integers";
  TVM_FFI_CHECK(t.size(0) == size, ValueError) << name << " must have " << size << " entries, got " << t.size(0);
  return data_of<T>(t);
}

}  // namespace create_kv_indices_detail

template <typename PoolIndexT, typename StartT>
void create_kv_indices(TensorView req_to_token, TensorView req_pool_indices, TensorView page_kernel_lens,
                       TensorView kv_indptr, Optional<TensorView> kv_start_idx, TensorView kv_indices) {
  using namespace create_kv_indices_detail;
  TVM_FFI_CHECK(req_to_token.ndim() == 2 && req_to_token.dtype().bits == 32 &&
                    (req_to_token.size(1) <= 1 || req_to_token.stride(1) == 1),
                ValueError)
      << "req_to_token must be a 2-D int32 tensor with dense rows";
  const int64_t batch_size = req_pool_indices.ndim() == 1 ? req_pool_indices.size(0) : -1;
  const auto* pool = vector_data<PoolIndexT>(req_pool_indices, "req_pool_indices", batch_size);
  const auto* lens = vector_data<int32_t>(page_kernel_lens, "page_kernel_lens", batch_size);
  const auto* indptr = vector_data<int32_t>(kv_indptr, "kv_indptr", batch_size + 1);
  const StartT* start = kv_start_idx.has_value()
                            ? vector_data<StartT>(kv_start_idx.value(), "kv_start_idx", batch_size)
                            : nullptr;
  const int64_t out_size = kv_indices.ndim() == 1 ? kv_indices.size(0) : -1;
  int32_t* out = vector_data<int32_t>(kv_indices, "kv_indices", out_size);

  const auto* table = data_of<const int32_t>(req_to_token);
  const int64_t num_rows = req_to_token.size(0);
  const int64_t row_len = req_to_token.size(1);
  for (int64_t i = 0; i < batch_size; ++i) {
    const int64_t row = static_cast<int64_t>(pool[i]);
    const int64_t begin = start == nullptr ? 0 : static_cast<int64_t>(start[i]);
    const int64_t len = lens[i];
    const int64_t offset = indptr[i];
    // Indices come from device-side bookkeeping; a bad one would read or
    // write out of bounds, so check them all (cheap next to the copy).
    TVM_FFI_CHECK(row >= 0 && row < num_rows, IndexError)
        << "req_pool_indices[" << i << "] = " << row << " is outside [0, " << num_rows << ")";
    TVM_FFI_CHECK(len >= 0 && begin >= 0 && begin + len <= row_len, IndexError)
        << "request " << i << " reads tokens [" << begin << ", " << begin + len << ") of a row of " << row_len;
    TVM_FFI_CHECK(offset >= 0 && offset + len <= out_size, IndexError)
        << "request " << i << " writes kv_indices[" << offset << ", " << offset + len << ") of " << out_size;
    std::memcpy(out + offset, table + row * req_to_token.stride(0) + begin, static_cast<size_t>(len) * sizeof(int32_t));
  }
}

}  // namespace mllm_kernel
