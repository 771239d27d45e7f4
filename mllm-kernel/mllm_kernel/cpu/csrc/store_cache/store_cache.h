// store_cache (CPU): k_cache[loc[i]] = k[i], v_cache[loc[i]] = v[i].
#pragma once

#include <cstring>

#include "common.h"

namespace mllm_kernel {
namespace store_cache_detail {

// Rows are dense over (H, D); consecutive tokens/slots may be strided.
inline void check_rows(const TensorView& t, const char* name, int64_t elem_bytes, int64_t row_elems) {
  TVM_FFI_CHECK(t.ndim() == 3, ValueError) << name << " must be 3-D, got " << t.ndim() << "-D";
  TVM_FFI_CHECK(t.dtype().bits == elem_bytes * 8, TypeError) << name << " has the wrong dtype";
  TVM_FFI_CHECK((t.size(2) <= 1 || t.stride(2) == 1) && (t.size(1) <= 1 || t.stride(1) == t.size(2)), ValueError)
      << name << " must be dense in its last two dims";
  TVM_FFI_CHECK(t.size(1) * t.size(2) == row_elems, ValueError) << name << " has a different row size than k";
}

}  // namespace store_cache_detail

template <typename T, typename IndexT>
void store_cache(TensorView k, TensorView v, TensorView k_cache, TensorView v_cache, TensorView out_cache_loc) {
  using namespace store_cache_detail;
  constexpr int64_t elem = sizeof(T);
  const int64_t row_elems = k.ndim() == 3 ? k.size(1) * k.size(2) : 0;
  check_rows(k, "k", elem, row_elems);
  check_rows(v, "v", elem, row_elems);
  check_rows(k_cache, "k_cache", elem, row_elems);
  check_rows(v_cache, "v_cache", elem, row_elems);
  TVM_FFI_CHECK(out_cache_loc.ndim() == 1 && out_cache_loc.dtype().bits == sizeof(IndexT) * 8, ValueError)
      << "out_cache_loc must be a 1-D tensor of " << sizeof(IndexT) * 8 << "-bit indices";
  const int64_t num_tokens = out_cache_loc.size(0);
  TVM_FFI_CHECK(k.size(0) == num_tokens && v.size(0) == num_tokens, ValueError)
      << "k, v and out_cache_loc disagree on the number of tokens";

  const auto* loc = data_of<const IndexT>(out_cache_loc);
  const int64_t loc_stride = out_cache_loc.stride(0);
  const int64_t num_slots = k_cache.size(0);
  TVM_FFI_CHECK(v_cache.size(0) == num_slots, ValueError) << "k_cache and v_cache must have the same number of slots";
  const auto* k_src = data_of<const T>(k);
  const auto* v_src = data_of<const T>(v);
  auto* k_dst = data_of<T>(k_cache);
  auto* v_dst = data_of<T>(v_cache);
  const size_t row_bytes = static_cast<size_t>(row_elems) * elem;
  for (int64_t i = 0; i < num_tokens; ++i) {
    const int64_t slot = static_cast<int64_t>(loc[i * loc_stride]);
    // Bounds are checked per token because a bad index would silently
    // corrupt memory; the check is negligible next to the row copy.
    TVM_FFI_CHECK(slot >= 0 && slot < num_slots, IndexError)
        << "out_cache_loc[" << i << "] = " << slot << " is outside [0, " << num_slots << ")";
    std::memcpy(k_dst + slot * k_cache.stride(0), k_src + i * k.stride(0), row_bytes);
    std::memcpy(v_dst + slot * v_cache.stride(0), v_src + i * v.stride(0), row_bytes);
  }
}

}  // namespace mllm_kernel
