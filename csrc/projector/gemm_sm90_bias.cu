// Default bias GEMM: the projector's second GEMM (K = 4096; 576 tokens per image = 3 x 192, no ragged tile),
// the fastest of benchmarks/sm90_tiles.py's candidates on an H200 (docs/kernels.md); see gemm_sm90.h.
#include "projector/gemm_sm90.cuh"

namespace sm90 = megavlm::projector::sm90;
using Gemm = sm90::Gemm<sm90::FusionBias, sm90::Tile<256, 192, 64>,
                         sm90::Cluster<1, 1>, sm90::Cooperative>;
MEGAVLM_SM90_GEMM_DEFAULT(bias, co256x192x64_c1x1, Gemm)
