// Tuning candidate (MEGAVLM_SM90_GEMM_TUNING=1, benchmarks/sm90_tiles.py); see gemm_sm90.h.
// The cooperative 128x256 / 256x128 main loops without the GELU: with bias/pp128x128x64_c2x1, the bias@gemm1 rows
// of benchmarks/sm90_tiles.py time the first GEMM's main loop (K = 1024) alone for each tile shape.
#include "projector/gemm_sm90.cuh"

namespace sm90 = megavlm::projector::sm90;
using Gemm = sm90::Gemm<sm90::FusionBias, sm90::Tile<256, 128, 64>,
                         sm90::Cluster<2, 1>, sm90::Cooperative>;
MEGAVLM_SM90_GEMM_ENTRY(bias, co256x128x64_c2x1, Gemm)
