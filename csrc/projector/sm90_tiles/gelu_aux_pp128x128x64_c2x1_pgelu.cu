// Tuning candidate (MEGAVLM_SM90_GEMM_TUNING=1, benchmarks/sm90_tiles.py); see gemm_sm90.h.
// The default GELU GEMM (with the aux store) with common/gelu.h's GELU instead of CUTLASS's erff one.
#include "projector/gemm_sm90.cuh"

namespace sm90 = megavlm::projector::sm90;
using Gemm = sm90::Gemm<sm90::FusionGeluPolyAux, sm90::Tile<128, 128, 64>,
                         sm90::Cluster<2, 1>, sm90::Pingpong>;
MEGAVLM_SM90_GEMM_ENTRY(gelu_aux, pp128x128x64_c2x1_pgelu, Gemm)
