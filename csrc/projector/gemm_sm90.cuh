// CUTLASS 3 kernel definitions behind gemm_sm90.h; each gemm_sm90_*.cu instantiates one epilogue (kept apart so the
// heavy instantiations compile in parallel). Kernels only: the checks live in op.cpp.
#pragma once

#include <algorithm>

#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/cutlass.h>
#include <cutlass/kernel_hardware_info.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "common/gelu.h"
#include "projector/gemm_sm90.h"

namespace megavlm {
namespace projector {
namespace sm90 {

using BF16 = cutlass::bfloat16_t;
// The weight [n, k] is the A operand of every batch: K contiguous, batch stride a compile-time 0 (so TMA sees no
// batch mode at all rather than a runtime stride of 0).
using StrideW = cute::Stride<int64_t, cute::Int<1>, cute::Int<0>>;
constexpr int kAlign = 8;  // 16 bytes of bf16: TMA's alignment for every base address and leading dimension

// Per-row (= per out feature) fp32 bias, optionally followed by the exact GELU and an aux store of the
// pre-activation (what the backward needs).
using FusionBias = cutlass::epilogue::fusion::LinCombPerRowBias<BF16, float, float>;
using FusionGelu =
    cutlass::epilogue::fusion::LinCombPerRowBiasEltAct<cutlass::epilogue::thread::GELU, BF16, float, float>;
using FusionGeluAux = cutlass::epilogue::fusion::LinCombPerRowBiasEltActAux<
    cutlass::layout::ColumnMajor, cutlass::epilogue::thread::GELU, BF16, float, BF16, float>;
// The same exact GELU in fewer instructions than CUTLASS's (which evaluates erff): common/gelu.h. Candidates with the
// `_pgelu` suffix use it (benchmarks/sm90_tiles.py); the defaults keep CUTLASS's until a GPU run shows it faster.
template <class T>
struct GeluPoly {
  static const bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE T operator()(T const& value) const { return T(megavlm::gelu_poly(static_cast<float>(value))); }
};
template <class T, int N>
struct GeluPoly<cutlass::Array<T, N>> {
  static const bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& value) const {
    cutlass::Array<T, N> y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = T(megavlm::gelu_poly(static_cast<float>(value[i])));
    return y;
  }
};
using FusionGeluPoly = cutlass::epilogue::fusion::LinCombPerRowBiasEltAct<GeluPoly, BF16, float, float>;
using FusionGeluPolyAux = cutlass::epilogue::fusion::LinCombPerRowBiasEltActAux<
    cutlass::layout::ColumnMajor, GeluPoly, BF16, float, BF16, float>;
// D = acc + bias + C with an fp32 C shared by every batch (the patch embedding's position table).
using FusionBiasTable = cutlass::epilogue::fusion::LinCombPerRowBias<BF16, float, float, float>;
using StrideTable = cute::Stride<cute::Int<1>, int64_t, cute::Int<0>>;  // [n, tokens], features contiguous

// Kernel schedules: cooperative (both consumer warpgroups on one tile) or ping-pong (each warpgroup on its own
// tile, one's epilogue overlapping the other's MMAs: meant for short K and heavy epilogues such as the GELU GEMM).
struct Cooperative {
  using Kernel = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
};
struct Pingpong {
  using Kernel = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::TmaWarpSpecialized;
};

// Cooperative with the stream-K tile scheduler (splits the last wave's K across idle SMs).
struct StreamK : Cooperative {
  using Scheduler = cutlass::gemm::StreamKScheduler;
};

template <class Schedule, class = void>
struct SchedulerOf {
  using type = void;  // CUTLASS's default persistent scheduler
};
template <class Schedule>
struct SchedulerOf<Schedule, std::void_t<typename Schedule::Scheduler>> {
  using type = typename Schedule::Scheduler;
};

// A schedule with the epilogue's subtile fixed (rows x columns of the output staged through shared memory per TMA
// store) instead of CUTLASS's choice; candidates for the GELU GEMM, whose epilogue is what keeps it behind cuBLAS.
template <class Base, int M, int N>
struct WithEpilogueTile : Base {
  using EpilogueTile = cute::Shape<cute::Int<M>, cute::Int<N>>;
};

template <class Schedule, class = void>
struct EpilogueTileOf {
  using type = cutlass::epilogue::collective::EpilogueTileAuto;
};
template <class Schedule>
struct EpilogueTileOf<Schedule, std::void_t<typename Schedule::EpilogueTile>> {
  using type = typename Schedule::EpilogueTile;
};

template <int M, int N, int K>
using Tile = cute::Shape<cute::Int<M>, cute::Int<N>, cute::Int<K>>;
template <int M, int N>
using Cluster = cute::Shape<cute::Int<M>, cute::Int<N>, cute::_1>;

// ElementC void: no C operand (beta = 0).
template <class FusionOp, class TileShape, class ClusterShape, class Schedule = Cooperative, class ElementC = void,
          class StrideC = cutlass::layout::ColumnMajor>
struct Gemm {
  static constexpr bool kHasC = !cute::is_void_v<ElementC>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      typename EpilogueTileOf<Schedule>::type, float, float,
      ElementC, StrideC, kHasC ? 128 / cute::sizeof_bits_v<ElementC> : kAlign,
      BF16, cutlass::layout::ColumnMajor, kAlign,  // D: out features contiguous, tokens at a runtime stride
      typename Schedule::Epilogue, FusionOp>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, BF16, StrideW, kAlign, BF16, cutlass::layout::ColumnMajor,
      kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Schedule::Kernel>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, typename SchedulerOf<Schedule>::type>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Device::Arguments arguments(const LinearSm90Params& p) {
    typename Device::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = {p.n, p.tokens, p.k_dim, p.batch};
    // The SM count the persistent and stream-K tile schedulers divide by (CUTLASS queries it when left 0): at least
    // 1, so that sizing a workspace on a machine without a GPU raises the op's error instead of dividing by zero.
    if (cudaGetDevice(&args.hw_info.device_id) != cudaSuccess) args.hw_info.device_id = 0;
    args.hw_info.sm_count =
        std::max(1, cutlass::KernelHardwareInfo::query_device_multiprocessor_count(args.hw_info.device_id));
    args.mainloop.ptr_A = static_cast<const BF16*>(p.w);
    args.mainloop.dA = StrideW{static_cast<int64_t>(p.k_dim), cute::Int<1>{}, cute::Int<0>{}};
    args.mainloop.ptr_B = static_cast<const BF16*>(p.x);
    args.mainloop.dB = cute::make_stride(static_cast<int64_t>(p.k_dim), cute::Int<1>{},
                                         static_cast<int64_t>(p.tokens) * p.k_dim);
    if constexpr (kHasC) {
      args.epilogue.ptr_C = static_cast<const ElementC*>(p.table);
      args.epilogue.dC = StrideTable{cute::Int<1>{}, static_cast<int64_t>(p.n), cute::Int<0>{}};
    } else {
      args.epilogue.ptr_C = nullptr;
      args.epilogue.dC = cute::make_stride(cute::Int<1>{}, static_cast<int64_t>(p.n), int64_t{0});
    }
    args.epilogue.ptr_D = static_cast<BF16*>(p.out);
    args.epilogue.dD = cute::make_stride(cute::Int<1>{}, static_cast<int64_t>(p.out_token_stride),
                                         static_cast<int64_t>(p.out_batch_stride));
    auto& fusion = args.epilogue.thread;
    fusion.alpha = 1.0f;
    fusion.beta = kHasC ? 1.0f : 0.0f;
    fusion.bias_ptr = p.bias;
    if constexpr (FusionOp::IsAuxOutSupported) {
      fusion.aux_ptr = static_cast<BF16*>(p.aux);
      fusion.dAux = cute::make_stride(cute::Int<1>{}, static_cast<int64_t>(p.n),
                                      static_cast<int64_t>(p.tokens) * p.n);
    }
    return args;
  }

  static std::size_t workspace(const LinearSm90Params& p) { return Device::get_workspace_size(arguments(p)); }

  static const char* run(const LinearSm90Params& p, void* workspace, cudaStream_t stream) {
    Device gemm;
    auto args = arguments(p);
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) {
      return "CUTLASS cannot run this shape/alignment (can_implement failed)";
    }
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) {
      return "CUTLASS GEMM initialization failed";
    }
    if (gemm.run(stream) != cutlass::Status::kSuccess) return "CUTLASS GEMM launch failed";
    return nullptr;
  }
};

}  // namespace sm90
}  // namespace projector
}  // namespace megavlm

// Registers one instantiation as "EPILOGUE/TILES" (gemm_sm90.h); each .cu unit holds one, so that the heavy
// instantiations compile in parallel. GEMM is a type alias (sm90::Gemm<...>) declared before the macro. The
// _DEFAULT form also makes TILES its epilogue's default (only gemm_sm90_<epilogue>.cu uses it).
#define MEGAVLM_SM90_GEMM_REGISTER(EPILOGUE, TILES, GEMM, IS_DEFAULT)                                          \
  namespace {                                                                                                  \
  const bool megavlm_sm90_registered_##EPILOGUE##_##TILES = megavlm::projector::register_sm90_gemm(            \
      #EPILOGUE, #TILES, megavlm::projector::LinearSm90Gemm{&GEMM::workspace, &GEMM::run}, IS_DEFAULT);        \
  }
#define MEGAVLM_SM90_GEMM_ENTRY(EPILOGUE, TILES, GEMM) MEGAVLM_SM90_GEMM_REGISTER(EPILOGUE, TILES, GEMM, false)
#define MEGAVLM_SM90_GEMM_DEFAULT(EPILOGUE, TILES, GEMM) MEGAVLM_SM90_GEMM_REGISTER(EPILOGUE, TILES, GEMM, true)
