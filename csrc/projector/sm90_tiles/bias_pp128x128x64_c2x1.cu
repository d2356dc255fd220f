// Tuning candidate (MEGAVLM_SM90_GEMM_TUNING=1, benchmarks/sm90_tiles.py); see gemm_sm90.h.
// The default GELU GEMM's tiles and schedule with the bias epilogue only: benchmarks/sm90_tiles.py times it at
// the first GEMM's shape too, which separates the GELU's cost from the main loop's.
#include "projector/gemm_sm90.cuh"

namespace sm90 = megavlm::projector::sm90;
using Gemm = sm90::Gemm<sm90::FusionBias, sm90::Tile<128, 128, 64>,
                         sm90::Cluster<2, 1>, sm90::Pingpong>;
MEGAVLM_SM90_GEMM_ENTRY(bias, pp128x128x64_c2x1, Gemm)
