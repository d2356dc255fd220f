// Default gelu GEMM: the projector's first GEMM (K = 1024), ping-pong so that one warpgroup's GELU epilogue
// overlaps the other's MMAs; the fastest of benchmarks/sm90_tiles.py's candidates (docs/kernels.md); see gemm_sm90.h.
#include "projector/gemm_sm90.cuh"

namespace sm90 = megavlm::projector::sm90;
using Gemm = sm90::Gemm<sm90::FusionGelu, sm90::Tile<128, 128, 64>,
                         sm90::Cluster<2, 1>, sm90::Pingpong>;
MEGAVLM_SM90_GEMM_DEFAULT(gelu, pp128x128x64_c2x1, Gemm)
