// Tuning candidate (MEGAVLM_SM90_GEMM_TUNING=1, benchmarks/sm90_tiles.py); see gemm_sm90.h.
// Cooperative 256x128 (the fastest aux GEMM in one sweep) with common/gelu.h's GELU.
#include "projector/gemm_sm90.cuh"

namespace sm90 = megavlm::projector::sm90;
using Gemm = sm90::Gemm<sm90::FusionGeluPolyAux, sm90::Tile<256, 128, 64>,
                         sm90::Cluster<2, 1>, sm90::Cooperative>;
MEGAVLM_SM90_GEMM_ENTRY(gelu_aux, co256x128x64_c2x1_pgelu, Gemm)
