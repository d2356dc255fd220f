// Default gelu_aux GEMM: the gelu one that also stores the pre-activation for the backward (the same tiles, so
// that $MEGAVLM_SM90_GELU_TILES names both); see gemm_sm90.h. In the same H200 sweep pp128x128x64_c2x1 took
// 0.320 ms; co256x128x64_c2x1 0.312 ms (2.5% faster in that single run), pp128x128x128_c2x1 0.314,
// pp128x128x64_c1x1 0.318, pp64x256x64_c2x1 0.321 ms.
#include "projector/gemm_sm90.cuh"

namespace sm90 = megavlm::projector::sm90;
using Gemm = sm90::Gemm<sm90::FusionGeluAux, sm90::Tile<128, 128, 64>,
                         sm90::Cluster<2, 1>, sm90::Pingpong>;
MEGAVLM_SM90_GEMM_DEFAULT(gelu_aux, pp128x128x64_c2x1, Gemm)
