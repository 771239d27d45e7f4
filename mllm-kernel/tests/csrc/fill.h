// Test kernel: fills a tensor with a value given as template arguments, to
// exercise int and bool template parameters and includes of our headers.
#pragma once

#include "common.h"

namespace mllm_kernel_test {

template <typename T, int kValue, bool kNegate>
void fill(mllm_kernel::TensorView out) {
  T* data = static_cast<T*>(out.data_ptr());
  for (int64_t i = 0; i < out.numel(); ++i) data[i] = static_cast<T>(kNegate ? -kValue : kValue);
}

}  // namespace mllm_kernel_test
