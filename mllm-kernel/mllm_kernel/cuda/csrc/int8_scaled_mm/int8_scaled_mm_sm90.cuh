// int8 x int8 -> fp16/bf16 GEMM with per-row / per-column scales and bias fused into the
// epilogue, CUTLASS 3.x for Hopper (TMA loads, wgmma, warp-specialized persistent kernels).
// Needs sm_90a. Same contract as the SM80 kernel (see int8_scaled_mm_common.cuh).
//
// Epilogue visitor tree: out = scale_a[m] * (scale_b[n] * float(acc)) + bias[n], where
// scale_a is a column broadcast, scale_b and bias are row broadcasts, null bias reads as 0.
#pragma once

#include "int8_scaled_mm_common.cuh"

#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

namespace mllm_kernel {
namespace int8_scaled_mm_sm90_detail {

using namespace int8_scaled_mm_detail;
using cute::_0;
using cute::_1;
using cute::Shape;
using cute::Stride;

template <typename Out, typename TileShape, typename ClusterShape, typename KernelSchedule, typename EpilogueSchedule>
struct Sm90Gemm {
  static constexpr int kAlignOut = 128 / cutlass::sizeof_bits<Out>::value;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using ScaleA = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, _0>>;
  using ScaleB = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, _0>>;
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, Out, float, Stride<_0, _1, _0>>;
  using TimesScaleB = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, ScaleB, Acc>;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Out, float, kRound>, ScaleA,
      TimesScaleB, Bias>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void, cutlass::layout::RowMajor, kAlignOut,
      Out, cutlass::layout::RowMajor, kAlignOut, EpilogueSchedule, Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor, 16, int8_t,
      cutlass::layout::ColumnMajor, 16, int32_t, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static void run(const Problem& p, int sm_count) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideC = typename Kernel::StrideC;
    using StrideD = typename Kernel::StrideD;
    // (M, K) K-major A, (N, K) K-major B, (M, N) N-major D; the batch mode is unused.
    const StrideA stride_a{p.lda, _1{}, int64_t(0)};
    const StrideB stride_b{p.ldb, _1{}, int64_t(0)};
    const StrideD stride_d{int64_t(p.n), _1{}, int64_t(0)};

    typename CollectiveEpilogue::FusionCallbacks::Arguments fusion{
        {p.scale_a, 0.0f, {}},                          // ScaleA
        {{p.scale_b, 0.0f, {}}, {}, {}},                // ScaleB * acc
        {static_cast<const Out*>(p.bias), Out(0), {}},  // Bias (null -> 0)
        {},                                             // multiply-add
    };
    cutlass::KernelHardwareInfo hw_info;
    hw_info.device_id = p.device;
    hw_info.sm_count = sm_count;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {p.m, p.n, p.k, 1},
        {p.a, stride_a, p.b, stride_b},
        {fusion, nullptr, StrideC{}, static_cast<Out*>(p.out), stride_d},
        hw_info,
    };
    Gemm gemm;
    check_cutlass(gemm.can_implement(args), "int8_scaled_mm (sm90) can_implement");
    TVM_FFI_CHECK(Gemm::get_workspace_size(args) == 0, RuntimeError) << "int8_scaled_mm (sm90) needs a workspace";
    check_cutlass(gemm.initialize(args, nullptr, p.stream), "int8_scaled_mm (sm90) initialize");
    check_cutlass(gemm.run(p.stream), "int8_scaled_mm (sm90) run");
  }
};

// M <= 64 (decode batches): 64-row tiles, two consumer warpgroups ping-ponging over tiles.
template <typename Out>
using SmallM = Sm90Gemm<Out, Shape<cute::_64, cute::_128, cute::_128>, Shape<_1, _1, _1>,
                        cutlass::gemm::KernelTmaWarpSpecializedPingpong, cutlass::epilogue::TmaWarpSpecialized>;
// Prefill: 128x256 tiles shared by two cooperative warpgroups. The 1x2 cluster multicasts the
// activation tile to the two CTAs of neighbouring N tiles; clustering along N (always many
// tiles) rather than M keeps short prefills (one M tile) from idling half the cluster.
template <typename Out>
using LargeM = Sm90Gemm<Out, Shape<cute::_128, cute::_256, cute::_128>, Shape<_1, cute::_2, _1>,
                        cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                        cutlass::epilogue::TmaWarpSpecializedCooperative>;

}  // namespace int8_scaled_mm_sm90_detail

template <typename OutT>
void int8_scaled_mm_sm90(TensorView out, TensorView a, TensorView b, TensorView scale_a, TensorView scale_b,
                         Optional<TensorView> bias) {
  using namespace int8_scaled_mm_sm90_detail;
  using Out = typename CutlassType<OutT>::type;
  const Problem p = make_problem(out, a, b, scale_a, scale_b, bias, dl_code<OutT>());
  if (p.m == 0) return;
  tvm::ffi::CUDADeviceGuard guard(p.device);
  const int sms = sm_count(p.device);  // the persistent scheduler needs it on every launch
  if (p.m <= 64) {
    SmallM<Out>::run(p, sms);
  } else {
    LargeM<Out>::run(p, sms);
  }
}

}  // namespace mllm_kernel
