// Tuning candidate (MEGAVLM_SM90_GEMM_TUNING=1, benchmarks/sm90_tiles.py); see gemm_sm90.h.
#include "projector/gemm_sm90.cuh"

namespace sm90 = megavlm::projector::sm90;
using Gemm = sm90::Gemm<sm90::FusionBias, sm90::Tile<128, 192, 64>,
                         sm90::Cluster<4, 1>, sm90::Cooperative>;
MEGAVLM_SM90_GEMM_ENTRY(bias, co128x192x64_c4x1, Gemm)
