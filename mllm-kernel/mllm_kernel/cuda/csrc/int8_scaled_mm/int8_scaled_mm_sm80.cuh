// int8 x int8 -> fp16/bf16 GEMM with per-row / per-column scales and bias fused into the
// epilogue, CUTLASS 2.x (mma.sync, cp.async multistage). Runs on SM80 (A100), SM86/87/89
// (Jetson Orin) and also on SM90 when compiled for it.
//
// The epilogue is an epilogue visitor tree (EVT):
//   out = scale_a[m] * (scale_b[n] * float(acc)) + bias[n]
// where scale_a is a column vector broadcast along N, scale_b and bias are row vectors
// broadcast along M, and a null bias pointer reads as zeros (one kernel serves both cases).
#pragma once

#include "int8_scaled_mm_common.cuh"

// Order matters: the visitor headers assume the GEMM and conversion headers are already in.
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/default_gemm_universal_with_visitor.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>
#include <cutlass/epilogue/threadblock/fusion/visitors.hpp>

namespace mllm_kernel {
namespace int8_scaled_mm_sm80_detail {

using namespace int8_scaled_mm_detail;
using cute::_0;
using cute::_1;
using cute::Stride;

template <typename Out, typename TileShape, typename WarpShape, int kStages>
struct Sm80Gemm {
  static constexpr int kAlignOut = 128 / cutlass::sizeof_bits<Out>::value;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  using ThreadMap = cutlass::epilogue::threadblock::OutputTileThreadLayout<TileShape, WarpShape, Out, kAlignOut, 1>;

  using Acc = cutlass::epilogue::threadblock::VisitorAccFetch;
  using ScaleA = cutlass::epilogue::threadblock::VisitorColBroadcast<ThreadMap, float, Stride<_1, _0, int32_t>>;
  using ScaleB = cutlass::epilogue::threadblock::VisitorRowBroadcast<ThreadMap, float, Stride<_0, _1, int32_t>>;
  using Bias = cutlass::epilogue::threadblock::VisitorRowBroadcast<ThreadMap, Out, Stride<_0, _1, int32_t>>;
  using TimesScaleB = cutlass::epilogue::threadblock::Sm80EVT<
      cutlass::epilogue::threadblock::VisitorCompute<cutlass::multiplies, float, float, kRound>, ScaleB, Acc>;
  using Result = cutlass::epilogue::threadblock::Sm80EVT<
      cutlass::epilogue::threadblock::VisitorCompute<cutlass::homogeneous_multiply_add, Out, float, kRound>, ScaleA,
      TimesScaleB, Bias>;
  using Store =
      cutlass::epilogue::threadblock::VisitorAuxStore<ThreadMap, Out, kRound, Stride<int64_t, _1, int64_t>>;
  using Epilogue = cutlass::epilogue::threadblock::Sm80EVT<Store, Result>;

  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      int8_t, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, 16,    // A
      int8_t, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, 16,  // B
      Out, cutlass::layout::RowMajor, kAlignOut,                                    // C/D
      int32_t, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, TileShape, WarpShape,
      cutlass::gemm::GemmShape<16, 8, 32>, Epilogue, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>,
      kStages, cutlass::arch::OpMultiplyAddSaturate, 1>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static void run(const Problem& p) {
    typename Epilogue::Arguments epilogue{
        {
            {p.scale_a, 0.0f, {}},                                            // ScaleA
            {{p.scale_b, 0.0f, {}}, {}, {}},                                  // ScaleB * acc
            {static_cast<const Out*>(p.bias), Out(0), {}},                    // Bias (null -> 0)
            {},                                                               // multiply-add
        },
        {static_cast<Out*>(p.out), {static_cast<int64_t>(p.n), _1{}, static_cast<int64_t>(p.m) * p.n}},  // Store
    };
    const int64_t ldc = p.n;
    typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm, {p.m, p.n, p.k}, 1, epilogue, p.a, p.b,
                                  nullptr, nullptr, 0, 0, 0, 0, p.lda, p.ldb, ldc, ldc);
    Gemm gemm;
    check_cutlass(gemm.can_implement(args), "int8_scaled_mm (sm80) can_implement");
    TVM_FFI_CHECK(Gemm::get_workspace_size(args) == 0, RuntimeError) << "int8_scaled_mm (sm80) needs a workspace";
    check_cutlass(gemm.initialize(args, nullptr, p.stream), "int8_scaled_mm (sm80) initialize");
    check_cutlass(gemm.run(p.stream), "int8_scaled_mm (sm80) run");
  }
};

// Small M (decode batches, short prefills): narrow tiles give more CTAs over N.
template <typename Out>
using SmallM = Sm80Gemm<Out, cutlass::gemm::GemmShape<64, 128, 64>, cutlass::gemm::GemmShape<32, 64, 64>, 5>;
// Prefill: the 128x128 tile that keeps tensor cores fed on A100 and Orin alike.
template <typename Out>
using LargeM = Sm80Gemm<Out, cutlass::gemm::GemmShape<128, 128, 64>, cutlass::gemm::GemmShape<64, 64, 64>, 4>;

}  // namespace int8_scaled_mm_sm80_detail

template <typename OutT>
void int8_scaled_mm_sm80(TensorView out, TensorView a, TensorView b, TensorView scale_a, TensorView scale_b,
                         Optional<TensorView> bias) {
  using namespace int8_scaled_mm_sm80_detail;
  using Out = typename CutlassType<OutT>::type;
  const Problem p = make_problem(out, a, b, scale_a, scale_b, bias, dl_code<OutT>());
  if (p.m == 0) return;
  tvm::ffi::CUDADeviceGuard guard(p.device);
  if (p.m <= 64) {
    SmallM<Out>::run(p);
  } else {
    LargeM<Out>::run(p);
  }
}

}  // namespace mllm_kernel
