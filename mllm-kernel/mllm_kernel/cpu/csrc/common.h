// Shared helpers for mllm_kernel CPU kernels.
#pragma once

#include <cstdint>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/optional.h>

namespace mllm_kernel {

using tvm::ffi::Optional;
using tvm::ffi::TensorView;

// C++17 has no 16-bit float types. The copy kernels only need the element
// size, so half-precision dtypes map to these opaque storage types.
struct alignas(2) fp16_t {
  uint16_t bits;
};
struct alignas(2) bf16_t {
  uint16_t bits;
};

// DLPack allows a byte offset on top of the data pointer; torch folds it into
// the pointer, other producers may not.
template <typename T>
T* data_of(const TensorView& t) {
  return reinterpret_cast<T*>(static_cast<char*>(t.data_ptr()) + t.byte_offset());
}

}  // namespace mllm_kernel
