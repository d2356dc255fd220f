// Tuning candidate (MEGAVLM_SM90_GEMM_TUNING=1, benchmarks/sm90_tiles.py); see gemm_sm90.h.
#include "projector/gemm_sm90.cuh"

namespace sm90 = megavlm::projector::sm90;
using Gemm = sm90::Gemm<sm90::FusionGelu, sm90::Tile<128, 128, 128>,
                         sm90::Cluster<2, 1>, sm90::Pingpong>;
MEGAVLM_SM90_GEMM_ENTRY(gelu, pp128x128x128_c2x1, Gemm)
